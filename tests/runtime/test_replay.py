"""KV replay: requests paused mid-decode, their KV wiped, resumed with a replay of their tokens,
end with the undisturbed tokens (and without the replay they would not)."""

import jax
import jax.numpy as jnp

from jblock.runtime import replay
from jblock.runtime.engine import Engine
from jblock.runtime.step import StepItem
from tests.runtime.test_engine_core import CONFIG, NEW, PROMPTS
from tests.runtime.test_engine_core import expected, specs  # noqa: F401 (fixtures)
from tests.serving.serving_helpers import wait_until


def _wipe_kv_mid_decode(engine, jobs, rebuild):
  """Submits `jobs`, and once each has 2 tokens pauses them all, zeroes every KV pool and
  resumes them through `rebuild(scheduler, req)`; returns their tokens."""
  handles = [engine.submit(name, PROMPTS[i], max_new_tokens=NEW) for name, i in jobs]
  wait_until(lambda: all(len(h.tokens) >= 2 for h in handles), timeout=120)
  with engine._lock, engine._local.dispatch_lock:
    paused = replay.pause_all(engine._scheduler, set(engine._instances))
    assert {r.handle for r in paused} == {h for h in handles if not h.done}
    assert all(len(r.generated) < NEW for r in paused)
    for inst in engine._instances.values():
      if inst.kind == "layers":
        inst.kv = jax.tree.map(jnp.zeros_like, inst.kv)
        inst.pool.drop_cache()  # a pool that lost its KV forgets its cached prefixes
    for req in paused:
      rebuild(engine._scheduler, req)
    engine._lock.notify_all()
  return [h.result(120) for h in handles]


def test_replay_rebuilds_wiped_kv_and_output_is_undisturbed(specs, expected):
  jobs = [("base", 4), ("tuned", 7), ("base", 9)]
  want = [expected[name][i] for name, i in jobs]
  with Engine(specs, config=CONFIG, mesh_shape=(1, 1)) as engine:
    assert _wipe_kv_mid_decode(engine, jobs, replay.resume) == want

    def no_replay(scheduler, req):  # the pending step alone, over the wiped KV
      scheduler._enqueue(StepItem(req, 0, req.cached, 1, 1, True, [req.generated[-1]]))

    assert _wipe_kv_mid_decode(engine, jobs, no_replay) != want
    assert all(b["kv_slots_used"] == 0 for b in engine.stats()["blocks"])
