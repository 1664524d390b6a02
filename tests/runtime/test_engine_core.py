"""The engine core on a tiny model: paged KV at page boundaries, fused segments, seeds, overlap.

The reference is jblock's own Model.generate (the same block functions, one batch, contiguous
pages), which tests/models checks against transformers.
"""

import dataclasses

import numpy as np
import pytest

import jblock
from jblock.blocks import Block
from jblock.convert import convert
from jblock.errors import InvalidRequestError
from jblock.runtime.engine import Engine, EngineConfig, ModelSpec
from jblock.train import variants

NEW = 10
PROMPTS = [list(np.random.default_rng(i).integers(1, 97, 3 + (i * 5) % 11)) for i in range(10)]
# Pages of 4 tokens: prompts of 3..13 tokens and 10 new ones cross several page boundaries.
CONFIG = EngineConfig(batch_size=4, kv_slots=3, kv_pages=18, page_size=4, max_seq_len=32,
                      prefill_chunk=8, length_buckets=(4, 8), warmup=False)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
  """A base and a partial fine-tune of its top layer (sharing embed, 2 layers and head)."""
  root = tmp_path_factory.mktemp("core")
  spec = variants.BaseSpec(family="llama", hidden=40, layers=3, heads=4, kv_heads=2, vocab=97,
                           max_positions=64)
  base = convert(variants.init_base(spec, str(root / "base"), seed=3))
  top = base.blocks[3]
  rng = np.random.default_rng(7)
  tuned_top = Block(top.kind, top.config, _perturb(top.params, rng))
  tuned = base.blocks[:3] + [tuned_top] + base.blocks[4:]
  return [ModelSpec("base", base.config, base.blocks), ModelSpec("tuned", base.config, tuned)]


def _perturb(tree, rng):
  return {k: _perturb(v, rng) if isinstance(v, dict) else
          (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in tree.items()}


@pytest.fixture(scope="module")
def expected(specs):
  out = {}
  for spec in specs:
    model = jblock.Model(spec.config, spec.chain)
    out[spec.name] = [model.generate([p], NEW)[0].tolist() for p in PROMPTS]
  return out


def test_paged_kv_across_page_boundaries_and_page_reuse(specs, expected):
  # 10 requests through 3 leases and 18 pages: later requests reuse freed pages.
  with Engine(specs, config=CONFIG, mesh_shape=(1, 1)) as engine:
    handles = [engine.submit(("base", "tuned")[i % 2], p, max_new_tokens=NEW)
               for i, p in enumerate(PROMPTS)]
    got = [h.result(120) for h in handles]
    assert got == [expected[("base", "tuned")[i % 2]][i] for i in range(len(PROMPTS))]
    layers = [b for b in engine.stats()["blocks"] if b["kind"] == "layers"]
    assert all(b["kv_pages_used"] == 0 and b["kv_slots_used"] == 0 for b in layers)


def test_cancelled_request_frees_pages_for_the_next(specs, expected):
  cfg = dataclasses.replace(CONFIG, kv_slots=1)
  with Engine(specs[:1], config=cfg, mesh_shape=(1, 1)) as engine:
    long = engine.submit("base", PROMPTS[9], max_new_tokens=18)
    next(iter(long))
    queued = engine.submit("base", PROMPTS[4], max_new_tokens=NEW)
    long.cancel()
    assert queued.result(120) == expected["base"][4]  # written into the cancelled one's pages
    assert long.finish_reason == "cancelled"


def test_fused_segments_give_identical_tokens(specs, expected):
  for fuse in (True, False):
    cfg = dataclasses.replace(CONFIG, fuse_segments=fuse)
    with Engine(specs, config=cfg, mesh_shape=(1, 1)) as engine:
      segments = engine.stats()["segments"]
      handles = [engine.submit("tuned", p, max_new_tokens=NEW) for p in PROMPTS[:4]]
      assert [h.result(120) for h in handles] == expected["tuned"][:4]
    # Shared bottom (embed + 2 layers) fused; each model's top alone; the shared head alone.
    assert [len(s) for s in segments["tuned"]] == ([3, 1, 1] if fuse else [1, 1, 1, 1, 1])


def test_one_model_alone_runs_as_one_call(specs):
  with Engine(specs[:1], config=CONFIG, mesh_shape=(1, 1)) as engine:
    engine.submit("base", PROMPTS[0], max_new_tokens=3).result(60)
    assert [len(s) for s in engine.stats()["segments"]["base"]] == [5]
    assert {t["kind"] for t in engine.trace()} == {"embed+layers+layers+layers+head"}


def test_two_segments_in_flight_at_once(specs):
  with Engine(specs, config=CONFIG, mesh_shape=(1, 1)) as engine:
    handles = [engine.submit(("base", "tuned")[i % 2], p, max_new_tokens=NEW)
               for i, p in enumerate(PROMPTS[:6])]
    for h in handles:
      h.result(120)
    trace = engine.trace()
  overlapping = [(a, b) for a in trace for b in trace
                 if a["blocks"] != b["blocks"] and a["dispatched"] < b["dispatched"] < a["done"]]
  assert overlapping  # a batch of one segment was dispatched while another's was still running


def test_seed_beyond_32_bits_is_unchanged_by_batch_mates(specs):
  kw = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.95, seed=2**40)
  with Engine(specs, config=CONFIG, mesh_shape=(1, 1)) as engine:
    alone = engine.submit("tuned", PROMPTS[2], **kw).result(60)
    mates = [engine.submit("base", p, max_new_tokens=NEW, temperature=0.7, seed=2**63 + i)
             for i, p in enumerate(PROMPTS[:3])]
    together = engine.submit("tuned", PROMPTS[2], **kw).result(60)
    assert all(len(h.result(60)) == NEW for h in mates)
    low_word = engine.submit("tuned", PROMPTS[2], **dict(kw, seed=0)).result(60)
  assert alone == together
  assert alone != low_word  # the high word really reaches the key


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, "7"])
def test_bad_seed_is_refused_and_never_fails_batch_mates(specs, expected, seed):
  with Engine(specs[:1], config=CONFIG, mesh_shape=(1, 1)) as engine:
    running = engine.submit("base", PROMPTS[1], max_new_tokens=NEW)
    with pytest.raises(InvalidRequestError, match="seed"):
      engine.submit("base", PROMPTS[2], max_new_tokens=NEW, seed=seed)
    assert running.result(60) == expected["base"][1]


def test_same_kv_memory_serves_more_short_requests(specs, expected):
  # The KV of 2 full-length (32-token) requests: 16 pages of 4. Short requests (<= 12 tokens,
  # 3 pages) run 5 at a time in it; the old slots x max_len layout ran 2.
  cfg = dataclasses.replace(CONFIG, kv_slots=8, kv_pages=16, batch_size=8)
  prompts = [p[:4] for p in PROMPTS[:8]]
  with Engine(specs[:1], config=cfg, mesh_shape=(1, 1)) as engine:
    handles = [engine.submit("base", p, max_new_tokens=8) for p in prompts]
    outs = [h.result(120) for h in handles]
    batch_rows = max(t["items"] for t in engine.trace() if t["length"] == 1)
  model = jblock.Model(specs[0].config, specs[0].chain)
  assert outs == [model.generate([p], 8)[0].tolist() for p in prompts]
  assert batch_rows == 5  # decode batches of 5 concurrent requests


def _windowed(spec: ModelSpec, window: int) -> ModelSpec:
  config = dataclasses.replace(spec.config, sliding_windows=(window,) * spec.config.num_layers)
  chain = [Block(b.kind, {**b.config, "sliding_windows": [window] * b.config["num_layers"]}, b.params)
           if b.kind == "layers" else b for b in spec.chain]
  return ModelSpec("windowed", config, chain)


def test_sliding_window_layers_keep_only_a_ring_of_pages(specs):
  # Window 5, chunks of 8, pages of 4: a ring of 4 pages holds everything a chunk can reach,
  # so a 23-token request runs in a 4-page pool (it would need 6 pages without the window).
  spec = _windowed(specs[0], 5)
  cfg = dataclasses.replace(CONFIG, kv_slots=1, kv_pages=4)
  prompt = PROMPTS[9] + PROMPTS[8][:2]  # 13 tokens: two prefill chunks
  want = jblock.Model(spec.config, spec.chain).generate([prompt], NEW)[0].tolist()
  with Engine([spec], config=cfg, mesh_shape=(1, 1)) as engine:
    h = engine.submit("windowed", prompt, max_new_tokens=NEW)
    assert h.result(120) == want
    again = engine.submit("windowed", PROMPTS[3], max_new_tokens=NEW).result(120)
  assert again == jblock.Model(spec.config, spec.chain).generate([PROMPTS[3]], NEW)[0].tolist()
