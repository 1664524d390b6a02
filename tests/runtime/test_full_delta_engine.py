"""Full fine-tunes served as compressed deltas through their base's instances: rows of the base,
a partial fine-tune, a LoRA adapter and two compressed fine-tunes (int4, and bitdelta with
distilled scales) share batches, and each row gets the tokens it gets alone, which are those of
the materialised model (base + decoded delta); more delta models than bank slots swap under
concurrency without a wrong token."""

import numpy as np
import pytest
import torch
import transformers

from jblock.convert import full_delta
from jblock.models.config import ModelConfig
from jblock.models.reference import Model
from jblock.runtime.engine import Engine, EngineConfig
from jblock.zoo.full_deltas import DeltaOptions, convert_full_delta
from jblock.zoo.store import Zoo
from tests import hf_models
from tests.lora_adapters import make_adapter

NEW = 8
CONFIG = EngineConfig(batch_size=8, kv_slots=16, max_seq_len=32, prefill_chunk=16,
                      length_buckets=(16,), warmup=False, lora_slots=2, lora_max_rank=8)
PROMPTS = [list(np.random.default_rng(i).integers(0, 128, 3 + (i * 5) % 12)) for i in range(6)]
MODELS = ["base", "ft", "a1", "d1", "d2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("full_delta_engine")
  cls_name, kwargs = hf_models.ENGINE_BASE
  base = str(root / "base")
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(
      getattr(transformers, cls_name)(**kwargs)).eval().save_pretrained(base)
  ft = hf_models.partial_variants(base, str(root), n=1, top_layers=1)[0]
  zoo = Zoo(str(root / "zoo"))
  zoo.convert(base, "base")
  zoo.convert(ft, "ft")
  make_adapter(base, str(root / "a1.peft"), targets=["q_proj", "v_proj"], r=4, alpha=8, std=0.3)
  zoo.convert_peft(str(root / "a1.peft"), "base", "a1")
  calibration = str(root / "calibration.npy")
  np.save(calibration, np.random.default_rng(0).integers(0, 128, 1024))
  for name, method, seed in (("d1", "int4", 1), ("d2", "bitdelta", 2)):
    hf = hf_models.full_finetune(base, str(root / name), std=0.3, seed=seed)
    convert_full_delta(zoo, hf, "base", name, DeltaOptions(method=method, calibration=calibration,
                                                           distill_steps=10))
  return zoo


def _materialised_tokens(zoo, name, prompt):
  manifest = zoo.manifest(name)
  chain = [zoo.load_block(i) for i in manifest["chain"]]
  for pos, delta_id in enumerate(manifest["deltas"]):
    if delta_id:
      chain[pos] = full_delta.materialize(chain[pos], zoo.load_block(delta_id))
  model = Model(ModelConfig.from_dict(manifest["config"]), chain)
  return np.asarray(model.generate([prompt], max_new_tokens=NEW)).reshape(-1)[-NEW:].tolist()


def test_compressed_finetunes_batch_with_base_adapter_and_partial_finetune(setup):
  zoo = setup
  for name in ("d1", "d2"):
    record = zoo.manifest(name)["full_delta"]
    layers = [e for p, e in record["encodings"].items() if p not in ("0", str(len(record["encodings"]) - 1))]
    assert set(layers) == {zoo.manifest(name)["adapter"]["method"]}, record["encodings"]
  with Engine.from_zoo(zoo.root, models=MODELS, mesh_shape=(1, 1), config=CONFIG) as engine:
    solo = {}
    for m in MODELS:
      for i in range(3):
        solo[m, i] = engine.submit(m, PROMPTS[i], max_new_tokens=NEW).result(timeout=300)
    for m in ("d1", "d2"):
      assert any(solo[m, i] != solo["base", i] for i in range(3)), m
      for i in range(3):
        assert solo[m, i] == _materialised_tokens(zoo, m, PROMPTS[i]), (m, i)
    misses = engine.stats()["adapters"]["misses"]
    # Everything at once, twice over: three delta models over two slots swap while rows run.
    jobs = [(m, i) for _ in range(2) for i in range(3) for m in MODELS]
    handles = [(m, i, engine.submit(m, PROMPTS[i], max_new_tokens=NEW)) for m, i in jobs]
    for m, i, h in handles:
      assert h.result(timeout=300) == solo[m, i], (m, i)
    mixed = [t for t in engine.trace() if {"base", "a1", "d1"} <= set(t["models"])
             or {"d1", "d2"} <= set(t["models"])]
    assert mixed, engine.trace_text()
    stats = engine.stats()["adapters"]
    assert stats["misses"] > misses and stats["evictions"] > 0
    assert set(stats["registered"]) == {"a1", "d1", "d2"}
