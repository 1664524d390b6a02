"""LoRA adapters served through one shared base: rows of the base, a partial fine-tune and
several adapters share batches and each gets what transformers gives on the merged weights;
more adapters than bank slots swap in and out under concurrency (the host->device copy staged
outside the engine lock); load/unload of adapters."""

import numpy as np
import pytest
import torch
import transformers

from jblock.runtime.engine import Engine, EngineConfig
from jblock.zoo.store import Zoo
from tests import hf_models
from tests.lora_adapters import make_adapter

NEW_TOKENS = 8
CONFIG = EngineConfig(batch_size=8, kv_slots=16, max_seq_len=32, prefill_chunk=16,
                      length_buckets=(16,), warmup=False, lora_slots=2, lora_max_rank=8)
PROMPTS = [list(np.random.default_rng(i).integers(0, 128, 3 + (i * 5) % 12)) for i in range(12)]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "a1": dict(targets=ALL, r=4, alpha=8, seed=1),
    "a2": dict(targets=["q_proj", "v_proj"], r=8, alpha=16, rslora=True, seed=2),
    "a3": dict(targets=["up_proj", "down_proj"], r=2, alpha=4, layers=[1, 3], seed=3),
    "a4": dict(targets=["o_proj", "gate_proj"], r=6, alpha=6, seed=4,
               rank_pattern={"gate_proj": 3}),
}
MODELS = ["base", "ft", *ADAPTERS]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_engine")
  cls_name, kwargs = hf_models.ENGINE_BASE
  base = str(root / "base")
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(
      getattr(transformers, cls_name)(**kwargs)).eval().save_pretrained(base)
  ft = hf_models.partial_variants(base, str(root), n=1, top_layers=1)[0]
  zoo = Zoo(str(root / "zoo"))
  zoo.convert(base, "base")
  zoo.convert(ft, "ft")
  dirs = {"base": base, "ft": ft}
  for name, kw in ADAPTERS.items():
    dirs[name] = str(root / f"{name}.merged")
    make_adapter(base, str(root / f"{name}.peft"), merged_dir=dirs[name], std=0.3, **kw)
    zoo.convert_peft(str(root / f"{name}.peft"), "base", name)
  expected = {}
  for name, d in dirs.items():
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for i, p in enumerate(PROMPTS):
      with torch.no_grad():
        out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False)
      expected[name, i] = out[0, len(p):].tolist()
  # The adapters change the greedy tokens (otherwise the test would prove nothing).
  for name in ADAPTERS:
    assert any(expected[name, i] != expected["base", i] for i in range(len(PROMPTS)))
  return zoo, expected


@pytest.fixture(scope="module")
def engine(setup):
  zoo, _ = setup
  engine = Engine.from_zoo(zoo.root, models=MODELS, mesh_shape=(1, 1), config=CONFIG)
  yield engine
  engine.close()


def test_mixed_batches_of_base_finetune_and_adapters_match_transformers(engine, setup):
  _, expected = setup
  jobs = [(m, i) for i in range(6) for m in ("base", "ft", "a1", "a2")]
  handles = [(m, i, engine.submit(m, PROMPTS[i], max_new_tokens=NEW_TOKENS)) for m, i in jobs]
  for m, i, h in handles:
    assert h.result(timeout=300) == expected[m, i], (m, i)
  # Base rows, two adapters and the partial fine-tune (its shared bottom blocks) in one batch.
  shared = [t for t in engine.trace() if {"base", "ft", "a1", "a2"} <= set(t["models"])]
  assert shared, engine.trace_text()
  stats = engine.stats()
  adapters = stats["adapters"]
  assert adapters["registered"] == ["a1", "a2", "a3", "a4"]
  assert adapters["misses"] >= 2 and adapters["hits"] >= 1
  # Adapter models resolve to the base's instances: no block is loaded twice.
  assert stats["models"]["a1"] == stats["models"]["base"]
  banked = [b for b in stats["blocks"] if b["lora_bank_bytes"]]
  assert len(banked) == 4  # the base's four layers blocks, not the fine-tune's top


def test_more_adapters_than_slots_swap_and_stay_equal(engine, setup):
  _, expected = setup
  before = engine.stats()["adapters"]
  jobs = [(name, i) for i in range(6) for name in ("a1", "a2", "a3", "a4", "base")]
  handles = [(m, i, engine.submit(m, PROMPTS[i], max_new_tokens=NEW_TOKENS)) for m, i in jobs]
  for m, i, h in handles:
    assert h.result(timeout=300) == expected[m, i], (m, i)
  after = engine.stats()["adapters"]
  assert after["evictions"] > before["evictions"]
  assert after["misses"] - before["misses"] >= 4  # a3 and a4 swap in, then a1 and a2 again
  assert len(after["resident"]) <= CONFIG.lora_slots and not after["pinned"]
  # Every swap installed factors staged on the device at submit, before the engine lock.
  assert (after["staged_installs"] - before["staged_installs"] ==
          after["misses"] - before["misses"])
  print(f"bank: {after['hits']} hits, {after['misses']} misses, {after['evictions']} evictions, "
        f"{after['swap_s'] / max(after['misses'], 1) * 1e3:.2f} ms per swap")


def test_adapter_rows_never_share_kv_with_base_rows(engine):
  # 20 tokens: one full 16-token page that a request registers for the ones after it.
  long = [int(t) for t in np.random.default_rng(99).integers(0, 128, 20)]
  hits = lambda: engine.stats()["prefix_cache"]["hit_tokens"]
  base = engine.generate("base", long, max_new_tokens=NEW_TOKENS)
  before = hits()
  adapter = engine.generate("a2", long, max_new_tokens=NEW_TOKENS)  # its delta changes the KV
  assert hits() == before and adapter != base
  assert engine.generate("a2", long, max_new_tokens=NEW_TOKENS) == adapter  # its own page: reused
  assert hits() == before + 16
  assert engine.generate("base", long, max_new_tokens=NEW_TOKENS) == base
  assert hits() == before + 32


def test_swap_under_the_engine_lock_copies_nothing_to_the_device(engine, setup, monkeypatch):
  import threading
  from jblock.runtime import lora as lora_runtime
  _, expected = setup
  banks = engine._adapters
  name = next(a for a in ADAPTERS if a not in banks.stats()["resident"])
  banks.stage(name)  # what submit does before it takes the lock
  me, real_put, puts = threading.get_ident(), lora_runtime.jax.device_put, []
  monkeypatch.setattr(lora_runtime.jax, "device_put", lambda *a, **k: (
      puts.append(1) if threading.get_ident() == me else None, real_put(*a, **k))[1])
  misses = banks.misses
  with engine._lock:  # as the scheduler's admission holds it
    banks.acquire(name)
    banks.release(name)
  monkeypatch.undo()
  assert banks.misses == misses + 1 and puts == []  # a real swap, and no host->device copy
  i = list(ADAPTERS).index(name)
  assert engine.generate(name, PROMPTS[i], max_new_tokens=NEW_TOKENS) == expected[name, i]


def test_unload_frees_the_slot_and_load_brings_it_back(engine, setup):
  zoo, expected = setup
  assert engine.generate("a3", PROMPTS[1], max_new_tokens=NEW_TOKENS) == expected["a3", 1]
  assert "a3" in engine.stats()["adapters"]["resident"]
  engine.unload_model("a3")
  stats = engine.stats()["adapters"]
  assert "a3" not in stats["resident"] and "a3" not in stats["registered"]
  assert "a3" not in [m.name for m in engine.list_models()]
  assert engine.model_info("a1").base_model == "base" and engine.model_info("ft").base_model is None
  engine.load_model("a3")
  assert engine.generate("a3", PROMPTS[2], max_new_tokens=NEW_TOKENS) == expected["a3", 2]
  assert engine.generate("base", PROMPTS[2], max_new_tokens=NEW_TOKENS) == expected["base", 2]


def test_adapters_on_a_sharded_mesh(setup):
  zoo, expected = setup
  with Engine.from_zoo(zoo.root, models=["base", "a1", "a4"], mesh_shape=(2, 2),
                       config=CONFIG) as engine:
    jobs = [(m, i) for i in range(4) for m in ("base", "a1", "a4")]
    handles = [(m, i, engine.submit(m, PROMPTS[i], max_new_tokens=NEW_TOKENS)) for m, i in jobs]
    for m, i, h in handles:
      assert h.result(timeout=300) == expected[m, i], (m, i)
    inst = next(i for i in engine._instances.values() if i.lora_bank is not None)
    bank = inst.lora_bank["layer_0/attn/q"]["b"]  # column-parallel: b's outputs on "model"
    assert "model" in tuple(bank.sharding.spec)
