"""The scheduler alone: admission, fairness, KV leases, cancellation and routing, no devices."""

import itertools

import pytest

from jblock.errors import OverloadedError, StaleBatchError
from jblock.runtime.engine_api import RequestHandle, SamplingParams
from jblock.runtime import replay
from jblock.runtime.instance import InstanceBase
from jblock.runtime.kv import PagePool
from jblock.runtime.scheduler import Scheduler, SchedulerConfig
from jblock.runtime.segments import plan_segments


class FakeInstance(InstanceBase):
  """What the scheduler reads of an instance: key, kind, batch size, models, pool."""
  local = True  # may fuse

  def __init__(self, key, kind, batch_size=4, pages=0, leases=0, page_size=4):
    self.key, self.block_id, self.kind, self.batch_size = key, key, kind, batch_size
    self.config = {}
    self.models = set()
    self.pool = PagePool(pages, page_size, leases) if kind == "layers" else None
    self.batches_run = self.items_run = 0


def chains(shared_pages=64, private_pages=64, private_leases=8):
  embed, shared = FakeInstance("e", "embed"), FakeInstance("s", "layers", pages=shared_pages, leases=8)
  top_a = FakeInstance("ta", "layers", pages=private_pages, leases=private_leases)
  top_b = FakeInstance("tb", "layers", pages=64, leases=8)
  head = FakeInstance("h", "head")
  out = {"a": [embed, shared, top_a, head], "b": [embed, shared, top_b, head]}
  for name, chain in out.items():
    for inst in chain:
      inst.models.add(name)
  return out


CONFIG = SchedulerConfig(prefill_chunk=8, prefill_buckets=(4, 8), max_waiting=8, page_size=4,
                         max_pages=8)


_PROMPTS = itertools.count(1)


def submit(sched, segments, model, prompt_len=5, new=3, tenant="", prompt=None):
  """Queues a request; its prompt is new (no prefix another request computes) unless given."""
  handle = RequestHandle(f"{model}-{sched.num_waiting}-{len(sched.active)}", model, prompt_len)
  first = 1000 * next(_PROMPTS)
  prompt = prompt or list(range(first, first + prompt_len))
  return sched.add(handle, model, tenant, prompt, SamplingParams(max_new_tokens=new),
                   segments[model], frozenset())


def test_segments_fuse_only_what_every_model_traverses_together():
  segs = plan_segments(chains())
  assert [s.key for s in segs["a"]] == [("e", "s"), ("ta",), ("h",)]
  assert segs["a"][0] is segs["b"][0] and segs["a"][2] is segs["b"][2]  # shared queues
  alone = {"a": chains()["a"]}
  for inst in alone["a"]:
    inst.models = {"a"}
  assert [s.key for s in plan_segments(alone)["a"]] == [("e", "s", "ta", "h")]
  assert [len(s.instances) for s in plan_segments(alone, fuse=False)["a"]] == [1, 1, 1, 1]
  # Through shared blocks: one segment per model, the shared instances in both.
  both = plan_segments(chains(), through_shared=True)
  assert [s.key for s in both["a"]] == [("e", "s", "ta", "h")]
  assert [s.key for s in both["b"]] == [("e", "s", "tb", "h")]
  assert both["a"][0].instances[1] is both["b"][0].instances[1]


def test_leases_follow_real_lengths_and_cancel_frees_them_at_once():
  segs = plan_segments(chains())
  sched = Scheduler(CONFIG)
  req = submit(sched, segs, "a", prompt_len=5, new=3)  # 8 tokens = 2 pages of 4
  [batch] = sched.schedule()
  shared = segs["a"][0].instances[1].pool
  assert shared.num_pages - shared.free_pages == 2 and shared.leases == 1
  assert batch.meta.page_tables.shape == (1, 1, 2)  # one layers instance, width covers 5 tokens
  assert batch.meta.n_valid[0] == 5 and batch.t_pad == 8
  sched.cancel(req)
  assert [(o.handle, o.finish) for o in sched.take_outputs()] == [(req.handle, "cancelled")]
  assert shared.free_pages == shared.num_pages and shared.leases == 0
  sched.complete(batch, None, None)  # the in-flight batch comes back: dropped, nothing leaks
  assert not sched.active and sum(len(q) for q in sched.queues.values()) == 0


def test_no_head_of_line_blocking_across_models():
  # Model a's private top block can hold one request; a second one of a waits for it, and b's
  # requests behind it in arrival order are admitted anyway.
  segs = plan_segments(chains(private_leases=1))
  sched = Scheduler(CONFIG)
  first_a = submit(sched, segs, "a")
  second_a = submit(sched, segs, "a")
  b_reqs = [submit(sched, segs, "b") for _ in range(3)]
  sched.schedule()
  assert first_a in sched.active and second_a not in sched.active
  assert all(r in sched.active for r in b_reqs)
  sched.cancel(first_a)
  sched.schedule()
  assert second_a in sched.active


def test_fair_admission_prefers_the_tenant_with_fewer_active_requests():
  segs = plan_segments(chains(shared_pages=4))  # room for two 8-token requests at a time
  sched = Scheduler(CONFIG)
  heavy = [submit(sched, segs, "a", tenant="heavy") for _ in range(4)]
  light = submit(sched, segs, "b", tenant="light")
  sched.schedule()
  assert sched.active == {heavy[0], light}  # not heavy[0] and heavy[1], which came first


def test_cancelled_waiting_requests_leave_the_queue_at_once():
  segs = plan_segments(chains(shared_pages=2))  # one request runs, the rest wait
  sched = Scheduler(CONFIG)
  running = submit(sched, segs, "a")
  sched.schedule()
  waiting = [submit(sched, segs, "a") for _ in range(CONFIG.max_waiting)]
  with pytest.raises(OverloadedError, match="admission queue is full"):
    submit(sched, segs, "b")
  for req in waiting:
    sched.cancel(req)
  assert sched.num_waiting == 0
  live = submit(sched, segs, "b")  # a full queue of dead requests never refuses a live one
  assert live in [r for q in sched.waiting.values() for r in q] and running in sched.active


def test_per_model_waiting_bound():
  segs = plan_segments(chains(shared_pages=0))  # nothing fits: everything waits
  sched = Scheduler(SchedulerConfig(max_waiting=8, max_waiting_per_model=2, page_size=4, max_pages=8))
  submit(sched, segs, "a"), submit(sched, segs, "a")
  with pytest.raises(OverloadedError, match="model 'a'"):
    submit(sched, segs, "a")
  submit(sched, segs, "b")  # another model still gets in


def test_routing_prefill_chunks_then_decode_then_stop():
  segs = plan_segments(chains())
  sched = Scheduler(CONFIG)
  req = submit(sched, segs, "a", prompt_len=11, new=2)  # chunks of 8 + 3
  [b] = sched.schedule()
  assert (b.items[0].start, b.items[0].n, b.items[0].final) == (0, 8, False)
  sched.complete(b, "hidden", None)  # shared segment -> private top
  [b] = sched.schedule()
  assert b.segment.key == ("ta",)
  sched.complete(b, "hidden", None)  # not final: the next chunk starts at the embed
  [b] = sched.schedule()
  assert (b.items[0].start, b.items[0].n, b.items[0].final, b.t_pad) == (8, 3, True, 4)
  sched.complete(b, "hidden", None)
  [b] = sched.schedule()
  sched.complete(b, "hidden", None)
  [b] = sched.schedule()
  assert b.segment.key == ("h",) and b.meta.step[0] == 0
  assert [(o.handle, o.token, o.finish) for o in sched.complete(b, [7], None)] == [
      (req.handle, 7, None)]
  assert req.cached == 11
  [b] = sched.schedule()
  assert (b.items[0].start, b.items[0].n, b.items[0].x) == (11, 1, [7])
  for out in ("hidden", "hidden"):
    sched.complete(b, out, None)
    [b] = sched.schedule()
  assert [(o.token, o.finish) for o in sched.complete(b, [9], None)] == [(9, None), (None, "length")]
  assert segs["a"][0].instances[1].pool.leases == 0


def test_a_failed_batch_fails_only_its_rows():
  segs = plan_segments(chains())
  sched = Scheduler(CONFIG)
  a, b = submit(sched, segs, "a"), submit(sched, segs, "b")
  [batch] = sched.schedule()  # both in the shared segment
  sched.complete(batch, "hidden", None)
  batches = sched.schedule()  # each model's private top
  failed = next(x for x in batches if x.segment.key == ("ta",))
  [out] = sched.complete(failed, None, RuntimeError("boom"))
  assert out.handle is a.handle and out.finish == "error" and "boom" in str(out.error)
  assert b in sched.active


def test_a_batch_not_run_for_a_paused_row_queues_its_other_rows_again():
  segs = plan_segments(chains())
  sched = Scheduler(CONFIG)
  a, b = submit(sched, segs, "a"), submit(sched, segs, "b")
  [batch] = sched.schedule()  # both in the shared segment
  replay.pause(sched, a)  # a lost worker paused `a` after the batch was built
  assert sched.complete(batch, None, StaleBatchError("outlived its worker")) == []
  assert b in sched.active and not b.done and a.item is None
  [again] = sched.schedule()
  assert [it.req for it in again.items] == [b] and again.items[0].start == 0


def test_seeds_fold_into_two_words():
  segs = plan_segments(chains())
  sched = Scheduler(CONFIG)
  handle = RequestHandle("r", "a", 1)
  sched.add(handle, "a", "", [1], SamplingParams(max_new_tokens=1, seed=2**40 + 5), segs["a"],
            frozenset())
  batch = sched.schedule()[0]
  for out in ("hidden", "hidden"):
    sched.complete(batch, out, None)
    batch = sched.schedule()[0]
  assert batch.meta.seed_lo[0] == 5 and batch.meta.seed_hi[0] == 2**8


def test_a_request_waits_for_its_prefix_being_computed_then_adopts_it():
  segs = plan_segments(chains())
  sched = Scheduler(CONFIG)
  prompt = list(range(1, 11))  # 2 full pages of 4, then 2 tokens
  first = submit(sched, segs, "a", prompt_len=10, prompt=prompt)
  second = submit(sched, segs, "a", prompt_len=10, prompt=prompt)
  other_model = submit(sched, segs, "b", prompt_len=10, prompt=prompt)
  [batch] = sched.schedule()  # one prompt chunk of 8 tokens: a's and b's embed+shared segment
  assert first in sched.active and other_model in sched.active and second not in sched.active
  sched.complete(batch, "hidden", None)  # through the shared segment; then a's and b's tops
  for batch in sched.schedule():
    sched.complete(batch, "hidden", None)
  sched.schedule()
  assert second in sched.active  # a's first 8 tokens are cached in a's chain: it adopts them
  assert sched.prefix_cache.stats()["hit_tokens"] == 8
