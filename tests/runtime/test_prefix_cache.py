"""Prefix caching in the engine: a prefix computed once is reused by later requests of the same
model and, in the blocks they share, of other models; tokens never change.

Models: a base and a partial fine-tune of its top layers block (tests.runtime.test_engine_core):
embed, two layers blocks and the head shared, the top layers block private. The reference is
jblock's own Model.generate, which tests/models checks against transformers.
"""

import concurrent.futures
import dataclasses
import random
import time

import numpy as np
import pytest

import jblock
from jblock.runtime import replay
from jblock.runtime.engine import Engine, EngineConfig
from tests.runtime.test_engine_core import specs  # noqa: F401 (fixture)
from tests.serving.serving_helpers import wait_until

NEW = 6
PS = 4
CONFIG = EngineConfig(batch_size=4, kv_slots=6, page_size=PS, max_seq_len=48, prefill_chunk=8,
                      length_buckets=(4, 8), warmup=False)
SYSTEM = [int(t) for t in np.random.default_rng(11).integers(1, 97, 22)]  # 5 full pages + 2
SUFFIXES = [[int(t) for t in np.random.default_rng(20 + i).integers(1, 97, 3 + i)] for i in range(4)]
PROMPTS = [SYSTEM + s for s in SUFFIXES]


@pytest.fixture(scope="module")
def reference(specs):  # noqa: F811
  models = {s.name: jblock.Model(s.config, s.chain) for s in specs}
  cache = {}

  def tokens(name, prompt, new=NEW):
    key = (name, tuple(prompt), new)
    if key not in cache:
      cache[key] = models[name].generate([prompt], new)[0].tolist()
    return cache[key]

  return tokens


def _blocks(engine, models):
  """Layers blocks' stats, by the set of models that use them."""
  return {tuple(b["models"]): b for b in engine.stats()["blocks"]
          if b["kind"] == "layers" and set(b["models"]) == set(models)}


def _hit(engine):
  return engine.stats()["prefix_cache"]["hit_tokens"]


def test_cached_prefix_across_page_boundaries_same_tokens_as_uncached(specs, reference):  # noqa: F811
  with Engine(specs[:1], config=CONFIG, mesh_shape=(1, 1)) as engine:
    assert engine.generate("base", PROMPTS[0], max_new_tokens=NEW) == reference("base", PROMPTS[0])
    assert _hit(engine) == 0
    # The 5 full pages of the shared system prompt (20 tokens) are found; the rest is computed.
    assert engine.generate("base", PROMPTS[1], max_new_tokens=NEW) == reference("base", PROMPTS[1])
    assert _hit(engine) == 20
    # The same prompt again: every full page cached but the last, recomputed for its logits.
    assert engine.generate("base", PROMPTS[1], max_new_tokens=NEW) == reference("base", PROMPTS[1])
    assert _hit(engine) == 20 + 24
    # Generated tokens are cached too: a follow-up turn finds prompt and answer.
    turn = PROMPTS[1] + reference("base", PROMPTS[1]) + [7, 8]
    assert engine.generate("base", turn, max_new_tokens=4) == reference("base", turn, 4)
    assert _hit(engine) == 20 + 24 + 28
    stats = engine.stats()
    assert stats["prefix_cache"]["requests_hit"] == 3 and stats["prefix_cache"]["enabled"]
    assert all(b["kv_pages_used"] == 0 and b["kv_slots_used"] == 0 and b["prefix_cached_pages"] > 0
               for b in stats["blocks"] if b["kind"] == "layers")
  off = dataclasses.replace(CONFIG, enable_prefix_caching=False)
  with Engine(specs[:1], config=off, mesh_shape=(1, 1)) as engine:
    for _ in range(2):
      assert engine.generate("base", PROMPTS[1], max_new_tokens=NEW) == reference("base", PROMPTS[1])
    stats = engine.stats()
    assert _hit(engine) == 0 and not stats["prefix_cache"]["enabled"]
    assert all(b["prefix_cached_pages"] == 0 for b in stats["blocks"] if b["kind"] == "layers")


def test_cross_variant_prefix_shares_only_the_shared_blocks_kv(specs, reference):  # noqa: F811
  with Engine(specs, config=CONFIG, mesh_shape=(1, 1)) as engine:
    assert engine.generate("base", PROMPTS[0], max_new_tokens=NEW) == reference("base", PROMPTS[0])
    # The fine-tune finds the system prompt in the shared blocks' pools, not in its own top
    # block: it computes the prompt (for its top block) without rewriting the shared pages.
    assert engine.generate("tuned", PROMPTS[1], max_new_tokens=NEW) == reference("tuned", PROMPTS[1])
    assert _hit(engine) == 0
    shared = [b for b in engine.stats()["blocks"]
              if b["kind"] == "layers" and b["models"] == ["base", "tuned"]]
    base_top, = _blocks(engine, ["base"]).values()
    tuned_top, = _blocks(engine, ["tuned"]).values()
    full = (len(PROMPTS[0]) + NEW - 1) // PS  # pages of written KV: 6 (base) and 7 (tuned)
    full_tuned = (len(PROMPTS[1]) + NEW - 1) // PS
    assert len(shared) == 2
    for b in shared:  # the system prompt's 5 pages once, then each request's own pages
      assert b["prefix_hit_pages"] == 5
      assert b["prefix_cached_pages"] == full + full_tuned - 5
    assert base_top["prefix_hit_pages"] == tuned_top["prefix_hit_pages"] == 0
    assert base_top["prefix_cached_pages"] == full and tuned_top["prefix_cached_pages"] == full_tuned
    # Now its own top block has the prefix too: the next fine-tune request skips it.
    assert engine.generate("tuned", PROMPTS[2], max_new_tokens=NEW) == reference("tuned", PROMPTS[2])
    assert _hit(engine) == 20
    assert engine.generate("base", PROMPTS[3], max_new_tokens=NEW) == reference("base", PROMPTS[3])
    assert _hit(engine) == 40


def test_a_burst_behind_one_prompt_computes_it_once(specs, reference):  # noqa: F811
  with Engine(specs, config=CONFIG, mesh_shape=(1, 1)) as engine:
    jobs = [(m, p) for m in ("base", "tuned") for p in PROMPTS]  # submitted at once
    handles = [engine.submit(m, p, max_new_tokens=NEW) for m, p in jobs]
    assert [h.result(120) for h in handles] == [reference(m, p) for m, p in jobs]
    # Per model the first request computes the system prompt, the 3 others wait for its pages.
    assert _hit(engine) == 2 * 3 * 20
    computed = engine.stats()["prefix_cache"]["computed_tokens"]
    top = {m: _blocks(engine, [m]) for m in ("base", "tuned")}
    for m in ("base", "tuned"):
      (key, _), = [(b["key"], b) for b in top[m].values()]
      prompts = sum(len(p) for p in PROMPTS) - 3 * 20
      assert computed[key] == {"prompt": prompts, "decode": 4 * (NEW - 1)}


def test_eviction_under_pressure_with_requests_in_flight(specs, reference):  # noqa: F811
  # 24 pages a pool: two requests (8 pages each) at once, so later ones evict cached pages.
  cfg = dataclasses.replace(CONFIG, kv_pages=24)
  prompts = [p[i:] + [3 * i + 1] for i, p in enumerate(PROMPTS)] + PROMPTS
  with Engine(specs, config=cfg, mesh_shape=(1, 1)) as engine:
    jobs = [(("base", "tuned")[i % 2], p) for i, p in enumerate(prompts * 2)]
    handles = [engine.submit(m, p, max_new_tokens=NEW) for m, p in jobs]
    assert [h.result(120) for h in handles] == [reference(m, p) for m, p in jobs]
    blocks = [b for b in engine.stats()["blocks"] if b["kind"] == "layers"]
    assert sum(b["prefix_evicted_pages"] for b in blocks) > 0
    assert all(b["kv_pages_used"] == 0 and b["kv_slots_used"] == 0 for b in blocks)
    assert _hit(engine) > 0


def test_cancel_mid_prefill_frees_exactly_its_own_pages(specs, reference):  # noqa: F811
  long_prompt = SYSTEM + SUFFIXES[3] * 3  # 22 + 18 tokens: 3 prompt chunks after the prefix
  with Engine(specs[:1], config=CONFIG, mesh_shape=(1, 1)) as engine:
    keeper = engine.submit("base", PROMPTS[0], max_new_tokens=20)
    wait_until(lambda: len(keeper.tokens) >= 1, timeout=120)  # its prefix is registered
    held = sum(b["kv_pages_used"] for b in engine.stats()["blocks"] if b["kind"] == "layers")
    victim = engine.submit("base", long_prompt, max_new_tokens=NEW)
    victim.cancel()
    assert victim.finish_reason == "cancelled"
    now = sum(b["kv_pages_used"] for b in engine.stats()["blocks"] if b["kind"] == "layers")
    assert now == held  # the shared prefix pages are still the keeper's; the victim's are free
    assert keeper.result(120) == reference("base", PROMPTS[0], 20)
    assert all(b["kv_pages_used"] == 0 for b in engine.stats()["blocks"] if b["kind"] == "layers")


def test_a_replay_starts_after_the_registered_prefix(specs, reference):  # noqa: F811
  with Engine(specs[:1], config=CONFIG, mesh_shape=(1, 1)) as engine:
    engine.generate("base", PROMPTS[0], max_new_tokens=NEW)
    for _ in range(5):  # bounded: catch a request mid-decode (tiny models decode fast)
      handle = engine.submit("base", PROMPTS[1], max_new_tokens=20)
      deadline = time.monotonic() + 120
      while len(handle.tokens) < 2 and not handle.done and time.monotonic() < deadline:
        time.sleep(0.0005)
      with engine._local.dispatch_lock, engine._lock:  # no step runs meanwhile
        paused = replay.pause_all(engine._scheduler, set(engine._instances))
        for req in paused:
          replay.resume(engine._scheduler, req)
        engine._lock.notify_all()
      assert handle.result(120) == reference("base", PROMPTS[1], 20)
      if paused:
        break
    # The replay found the system prompt's pages and its own full prompt pages (24 tokens).
    assert paused and engine.stats()["prefix_cache"]["replay_reused_tokens"] >= 24


def test_concurrent_stress_ends_with_every_refcount_at_zero(specs, reference):  # noqa: F811
  rng = random.Random(5)
  jobs = [(rng.choice(["base", "tuned"]), rng.choice(PROMPTS), rng.random() < 0.25)
          for _ in range(40)]
  cfg = dataclasses.replace(CONFIG, kv_pages=40, kv_slots=5)

  def one(job):
    model, prompt, cancel = job
    handle = engine.submit(model, prompt, max_new_tokens=NEW)
    if cancel:
      handle.cancel()
      return None
    return handle.result(120)

  with Engine(specs, config=cfg, mesh_shape=(1, 1)) as engine:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      got = list(pool.map(one, jobs))
    for (model, prompt, cancel), tokens in zip(jobs, got):
      if not cancel:
        assert tokens == reference(model, prompt)
    blocks = [b for b in engine.stats()["blocks"] if b["kind"] == "layers"]
    # No page held (every refcount back to zero), every page free or cached-and-evictable.
    assert all(b["kv_pages_used"] == 0 and b["kv_slots_used"] == 0 for b in blocks)
    assert all(b["kv_pages_free"] == 40 and b["prefix_evictable_pages"] == b["prefix_cached_pages"]
               for b in blocks)
    assert _hit(engine) > 0
