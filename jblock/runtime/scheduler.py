"""The scheduler: a policy object that plans block batches and takes results back.

It owns the queues and the request state machine and nothing else: no threads, no devices, no
locks (the engine calls it under its lock); only it changes a request. `schedule()` admits
waiting requests (leasing KV pages in every layers instance of their chains) and returns the
next `BlockBatch`es as data; `complete()` routes every item of a finished batch on (to the next
segment, its next prompt chunk, or a sampled token) and returns the outputs as data
(`RequestOutput`: tokens, finishes, errors), which the engine delivers.

Admission is fair across tenants and never blocked by one request: every (tenant, model) has
its own FIFO, and each round admits, among the queue heads whose KV fits now, the one whose
tenant has the fewest active requests (then the oldest). A head that does not fit waits without
holding up anyone else's queue.

Prefix caching (jblock.runtime.kv): at admission every lease adopts the cached pages of its
longest registered prefix, and the request starts computing at the shortest of them (a page
boundary; its last prompt token is always computed, for its logits). Where an instance holds
more of the prefix than others (a shared bottom block that another variant filled), the
request recomputes those positions for the instances above but never rewrites the shared
pages. As a request's KV reaches a full page in every pool of its chain, the page is
registered for later requests.
"""

import collections
import dataclasses
import itertools
import time
from typing import Any, Callable

from jblock.errors import JBlockError, OverloadedError, StaleBatchError
from jblock.runtime import head_rows
from jblock.runtime.engine_api import (RequestHandle, SamplingParams, TokenConstraint,
                                       TokenLogprobs)
from jblock.runtime import prefix as prefix_lib
from jblock.runtime.kv import Lease
from jblock.runtime.segments import Segment
from jblock.runtime.batching import batch_meta
from jblock.runtime.step import BlockBatch, StepItem


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  prefill_chunk: int = 64  # longest prompt piece one step item carries
  prefill_buckets: tuple[int, ...] = (16, 64)  # padded prefill lengths (decode is length 1)
  max_waiting: int = 256  # waiting requests in all; beyond it submit raises OverloadedError
  max_waiting_per_model: int = 0  # waiting requests per model (0 = max_waiting)
  max_in_flight_per_segment: int = 1  # batches of one segment dispatched and not yet done
  page_size: int = 16  # tokens per KV page
  max_pages: int = 16  # pages of the longest request (max_seq_len / page_size)
  prefix_caching: bool = True  # reuse the KV of prefixes already computed (jblock.runtime.kv)
  max_prefix_wait_s: float = 5.0  # longest a request waits for a prefix another one computes

  def batch_buckets(self, batch_size: int) -> list[int]:
    return [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < batch_size] + [batch_size]

  def width_buckets(self) -> list[int]:
    return [w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if w < self.max_pages] + [self.max_pages]


@dataclasses.dataclass(frozen=True)
class RequestOutput:
  """What the scheduler produced for one request, as data: a token to stream, or its end
  (`finish` set: stop | length | cancelled | error). The engine hands it to the handle."""
  handle: RequestHandle
  token: int | None = None
  finish: str | None = None
  error: BaseException | None = None
  logprobs: TokenLogprobs | None = None  # the token's, when the request asked
  prompt_logprobs: list | None = None  # the next prompt tokens', when the request asked


@dataclasses.dataclass(eq=False)
class Request:
  handle: RequestHandle
  model: str
  tenant: str
  prompt: list[int]
  params: SamplingParams
  segments: list[Segment]  # the model's chain, cut into segments
  stop_ids: frozenset[int]
  arrived: int  # arrival order
  leases: dict[str, list[Lease]] = dataclasses.field(default_factory=dict)  # instance key -> leases
  tables: list[list[Lease]] = dataclasses.field(default_factory=list)  # per segment: a lease per layers instance
  cached: int = 0  # tokens already written to every KV pool of the chain
  generated: list[int] = dataclasses.field(default_factory=list)
  item: StepItem | None = None  # queued or in flight
  adapter_slot: int = -1  # LoRA bank slot the request holds while active (-1 = none)
  in_flight: bool = False
  done: bool = False
  epoch: int = 0  # bumped when the request is paused (jblock.runtime.replay): older steps are stale
  replay_to: int = 0  # > 0 while replaying: tokens of prompt + generated to write into KV again
  accuracy_budget: float | None = None  # the tenant's budget for rerouting (jblock.runtime.reroute)
  route: frozenset = frozenset()  # (chain position, block id) substitutions it runs with now
  replicas: dict = dataclasses.field(default_factory=dict)  # chain position -> the replica
  # instance it was bound to at admission (jblock.runtime.replicas); absent: the chain's own
  # The cached length at which the model computes every position again (its model config says
  # so: Phi-3 LongRoPE switches all frequencies when a sequence first passes it); 0 = never.
  recompute_at: int = 0
  kv_salt: str = ""  # what changes its KV besides the chain's blocks (an adapter's delta ids)
  token_hashes: list = dataclasses.field(default_factory=list)  # per full page (jblock.runtime.kv)
  committed_pages: int = 0  # full pages of its KV last offered to the prefix cache
  constraint: TokenConstraint | None = None  # the tokens it may generate next (a grammar)
  prompt_logprobs_sent: int = 0  # prompt positions whose logprobs went out (a replay skips them)

  @property
  def tokens_needed(self) -> int:
    return len(self.prompt) + self.params.max_new_tokens

  @property
  def last_kv_segment(self) -> int:
    """Index of the last segment that writes KV or feeds the head's input."""
    last = len(self.segments) - 1
    if self.params.prompt_logprobs is not None and not self.replay_to:
      return last  # every prompt chunk goes through the head, for its logprobs
    return last - 1 if len(self.segments[last].instances) == 1 and self.segments[last].ends_at_head \
        and last > 0 else last


class Scheduler:

  def __init__(self, config: SchedulerConfig, adapters=None,
               router: Callable[["Scheduler"], Callable[[Request], bool]] | None = None):
    """`adapters`: the LoRA bank slots (jblock.runtime.lora.AdapterBanks) admission leases.
    `router(scheduler)` builds the routing policy consulted at every step boundary: it may change
    the request's route (jblock.runtime.rerouter) and returns True when the request's KV must be
    rebuilt by a replay before its next step."""
    self.config = config
    self._outbox: list[RequestOutput] = []  # outputs since the last take_outputs()
    self.waiting: dict[tuple[str, str], collections.deque[Request]] = {}
    self.queues: dict[tuple[str, ...], collections.deque[StepItem]] = {}
    self.segments: dict[tuple[str, ...], Segment] = {}
    self.in_flight: collections.Counter = collections.Counter()  # segment key -> batches
    self.active: set[Request] = set()
    self.finished = collections.Counter()
    self.prefix_cache = prefix_lib.PrefixCaching(config.prefix_caching, config.page_size,
                                                 config.max_prefix_wait_s)
    self.computed = collections.Counter()  # (instance key, prompt | decode) -> tokens computed
    self._arrivals = itertools.count()
    self._batches = itertools.count()
    self.adapters = adapters
    self.router = router(self) if router is not None else None

  # ---- requests in ----------------------------------------------------------------------

  @property
  def num_waiting(self) -> int:
    return sum(len(q) for q in self.waiting.values())

  def add(self, handle: RequestHandle, model: str, tenant: str, prompt: list[int],
          params: SamplingParams, segments: list[Segment], stop_ids: frozenset[int],
          kv_salt: str = "", recompute_at: int = 0,
          accuracy_budget: float | None = None,
          constraint: TokenConstraint | None = None) -> Request:
    """Queues a request; OverloadedError when the waiting bounds are reached. `kv_salt`: what
    besides its chain's blocks changes its KV (an adapter's deltas): keys its cached prefixes.
    `recompute_at`: the cached length at which the model's KV is computed again (0 = never).
    `accuracy_budget`: the tenant's budget for rerouting (jblock.runtime.reroute)."""
    cfg = self.config
    if self.num_waiting >= cfg.max_waiting:
      raise OverloadedError(f"admission queue is full ({cfg.max_waiting} waiting)")
    per_model = cfg.max_waiting_per_model or cfg.max_waiting
    if sum(len(q) for (t, m), q in self.waiting.items() if m == model) >= per_model:
      raise OverloadedError(f"admission queue of model {model!r} is full ({per_model} waiting)")
    req = Request(handle, model, tenant, prompt, params, segments, stop_ids, next(self._arrivals),
                  kv_salt=kv_salt, recompute_at=recompute_at, accuracy_budget=accuracy_budget,
                  constraint=constraint)
    self.waiting.setdefault((tenant, model), collections.deque()).append(req)
    return req

  def cancel(self, req: Request) -> None:
    """Ends a request at once: out of its waiting queue or segment queue, KV pages freed.

    Pages of a request whose batch is still in flight are freed too: a later owner's writes to
    those pages are ordered after the in-flight batch's on the same KV buffer.
    """
    if req.done:
      return
    queue = self.waiting.get((req.tenant, req.model))
    if queue is not None and req in queue:
      queue.remove(req)
    elif req.item is not None and not req.in_flight:
      q = self.queues.get(req.segments[req.item.pos].key)
      if q is not None and req.item in q:
        q.remove(req.item)
    self.finish(req, "cancelled")

  def finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
    """Frees every KV lease the request holds and ends its stream (once)."""
    if req.done:
      return
    req.done = True
    for leases in req.leases.values():
      for lease in leases:
        lease.release()
    req.leases.clear()
    if req.adapter_slot >= 0 and self.adapters is not None:
      self.adapters.release(req.model)
      req.adapter_slot = -1
    req.item = None
    self.active.discard(req)
    if req.handle.cancelled:
      reason, error = "cancelled", None  # the client ended it first: that is its end
    self._outbox.append(RequestOutput(req.handle, finish=reason, error=error))
    self.finished[reason] += 1

  def take_outputs(self) -> list[RequestOutput]:
    """Tokens and finishes produced since the last call, in order (the engine delivers them)."""
    out, self._outbox = self._outbox, []
    return out

  # ---- admission --------------------------------------------------------------------------

  def admit(self) -> None:
    """Starts every waiting request that fits now (see the module docstring for the order)."""
    active_by_tenant = collections.Counter(r.tenant for r in self.active)
    while True:
      best = None
      blocked = _oldest_waiting_for_adapter_slot(self.waiting, self.adapters)
      for queue in self.waiting.values():
        if not queue:
          continue
        head = queue[0]
        if head.handle.cancelled:  # cancelled without the engine hearing of it
          queue.popleft()
          self.finish(head, "cancelled")
          continue
        if blocked is not None and head.arrived > blocked and self.adapters.is_adapter(head.model):
          continue  # younger adapter requests let the pinned bank slots drain (no starvation)
        if not _fits(head, self.adapters, self.config.prefill_chunk):
          continue  # this queue waits; the others go on
        if self.prefix_cache.waits(head, self.active):
          continue  # its prefix is being computed: admitted once it is cached, not twice
        score = (active_by_tenant[head.tenant], head.arrived)
        if best is None or score < best[0]:
          best = (score, queue)
      if best is None:
        return
      req = best[1].popleft()
      self._start(req)
      active_by_tenant[req.tenant] += 1

  def _start(self, req: Request) -> None:
    cfg = self.config
    self.prefix_cache.lease_all(req, cfg.prefill_chunk)
    if self.adapters is not None:
      req.adapter_slot = self.adapters.acquire(req.model)
    self.active.add(req)
    if self.router is not None:
      self.router(req)  # nothing cached yet: nothing to replay
    req.cached = self.prefix_cache.start_of(req)  # after its cached prefix
    self.enqueue_prefill(req)

  def enqueue_prefill(self, req: Request) -> None:
    """Queues the request's next prompt chunk (or replay chunk: jblock.runtime.replay)."""
    cfg = self.config
    start = req.cached
    tokens = req.prompt + req.generated if req.replay_to else req.prompt
    end = req.replay_to or len(req.prompt)
    n = min(cfg.prefill_chunk, end - start)
    t_pad = next(b for b in sorted(cfg.prefill_buckets) + [cfg.prefill_chunk] if b >= n)
    final = start + n == len(req.prompt) and not req.replay_to
    self._enqueue(StepItem(req, 0, start, n, t_pad, final, tokens[start:start + n]))

  # ---- prefix caching (jblock.runtime.prefix) -----------------------------------------------

  def detach_prefix(self, req: Request, from_position: int, recompute: bool) -> bool:
    """Before the request's route changes at chain position `from_position`: its leases there
    and above stop feeding the prefix cache (and, with `recompute`, stop reading it). False when
    a KV pool has no room for that (the route must not change then)."""
    return self.prefix_cache.detach(req, from_position, recompute)

  def resume(self, req: Request) -> None:
    """Queues a paused request again: a replay of its cached tokens from the longest prefix its
    leases still hold registered, then its pending step. A request still in its prompt restarts
    the prompt (nothing was sampled yet) from that prefix."""
    if req.done:
      return
    target = max(req.cached, req.replay_to) if req.generated else len(req.prompt)
    start = self.prefix_cache.replay_start(req, target)
    if req.generated and start >= target:
      req.cached, req.replay_to = target, 0
      self._enqueue(StepItem(req, 0, req.cached, 1, 1, True, [req.generated[-1]]))
      return
    req.replay_to = target if req.generated else 0
    req.cached = start
    self.enqueue_prefill(req)

  def requeue(self, item: StepItem) -> None:
    """Queues an item again at the first segment of its request's (new) chain."""
    self._enqueue(item)

  def _enqueue(self, item: StepItem) -> None:
    item.epoch = item.req.epoch
    item.req.item = item
    item.enqueued = time.perf_counter()
    seg = item.req.segments[item.pos]
    self.segments.setdefault(seg.key, seg)
    self.queues.setdefault(seg.key, collections.deque()).append(item)

  # ---- planning ---------------------------------------------------------------------------

  def schedule(self) -> list[BlockBatch]:
    """Admits what fits, then returns batches for every segment that has work and room."""
    self.admit()
    batches = []
    while True:
      best, best_score = None, None
      for key, queue in self.queues.items():
        if not queue or self.in_flight[key] >= self.config.max_in_flight_per_segment:
          continue
        if not all(i.available for i in self.segments[key].instances):
          continue  # an instance is being re-placed: its queue waits
        seg = queue[0].req.segments[queue[0].pos]
        score = (min(len(queue), seg.batch_size) / seg.batch_size, -queue[0].enqueued)
        if best_score is None or score > best_score:
          best, best_score = key, score
      if best is None:
        return batches
      batches.append(self._take_batch(best))

  def _take_batch(self, key: tuple[str, ...]) -> BlockBatch:
    queue = self.queues[key]
    seg = self.segments[key]
    t_pad = queue[0].t_pad
    items = [it for it in queue if it.t_pad == t_pad][:seg.batch_size]
    for it in items:
      queue.remove(it)
      it.req.in_flight = True
    self.in_flight[key] += 1
    b_pad, meta = batch_meta(self.config, seg, items, t_pad, self.adapters)
    return BlockBatch(next(self._batches), seg, items, b_pad, t_pad, meta)

  # ---- results ----------------------------------------------------------------------------

  def complete(self, batch: BlockBatch, output: Any,
               error: BaseException | None) -> list[RequestOutput]:
    """Routes every item of a finished batch (output: hidden states, or tokens at the head);
    returns the outputs produced so far (take_outputs)."""
    self.in_flight[batch.segment.key] -= 1
    tokens = sum(it.n for it in batch.items)
    phase = "decode" if batch.t_pad == 1 else "prompt"
    for inst in batch.segment.instances:
      inst.batches_run += 1
      inst.items_run += len(batch.items)
      self.computed[inst.key, phase] += tokens
    for row, item in enumerate(batch.items):
      req = item.req
      if item.epoch != req.epoch:
        continue  # paused (and maybe replayed) since this batch left: its result is stale
      req.in_flight = False
      if req.done:
        continue
      if isinstance(error, StaleBatchError):
        self._enqueue(item)  # not run (other rows went stale): the same step goes again
      elif error is not None:
        self.finish(req, "error", error if isinstance(error, JBlockError) else JBlockError(
            f"block {batch.segment.instances[0].block_id[:12]} failed: {error!r}"))
      elif req.handle.cancelled:
        self.finish(req, "cancelled")
      else:
        self._route(item, batch.segment, output, row)
    return self.take_outputs()

  def _route(self, item: StepItem, seg: Segment, y, row: int) -> None:
    req = item.req
    if seg.ends_at_head:
      token, logprobs, prompt = head_rows.row_result(y, row, item)
      if prompt:
        first = 0 if item.start == 0 else item.start + 1  # the prompt index of prompt[0]
        prompt = prompt[max(req.prompt_logprobs_sent - first, 0):]
        req.prompt_logprobs_sent = max(req.prompt_logprobs_sent, first + len(prompt))
        if prompt:
          self._outbox.append(RequestOutput(req.handle, prompt_logprobs=prompt))
    if not item.final and item.pos >= req.last_kv_segment:
      req.cached = item.start + item.n  # this chunk is in every KV pool: send the next one
      self.prefix_cache.commit(req)
      if req.replay_to and req.cached >= req.replay_to:
        req.replay_to = 0  # KV rebuilt: the pending decode step goes on
        self._enqueue(StepItem(req, 0, req.cached, 1, 1, True, [req.generated[-1]]))
      else:
        self.enqueue_prefill(req)
      return
    if not seg.ends_at_head:
      self._enqueue(dataclasses.replace(item, pos=item.pos + 1, x=(y, row)))
      return
    req.cached = item.start + item.n
    self.prefix_cache.commit(req)
    req.generated.append(token)
    if token in req.stop_ids and len(req.generated) > req.params.min_tokens:
      self.finish(req, "stop")  # a stop token ends the request and is not emitted
      return
    if req.constraint is not None and not req.constraint.accept(token):
      self.finish(req, "error", JBlockError(f"token {token} broke the request's grammar"))
      return
    self._outbox.append(RequestOutput(req.handle, token=token, logprobs=logprobs))
    if req.constraint is not None and req.constraint.finished():
      self.finish(req, "stop")  # its grammar is complete: nothing else may follow
    elif len(req.generated) >= req.params.max_new_tokens:
      self.finish(req, "length")
    elif req.cached and req.cached == req.recompute_at:
      self.resume(req)  # the whole sequence again (never cached: its KV depends on the length)
    elif self.router is not None and self.router(req):
      self.resume(req)  # moved onto instances without its KV: replay, then this step
    else:
      self._enqueue(StepItem(req, 0, req.cached, 1, 1, True, [token]))

  def take_waiting(self, predicate: Callable[[Request], bool]) -> list[Request]:
    """Takes the waiting requests `predicate` selects out of their queues (for the caller to end)."""
    out = []
    for queue in self.waiting.values():
      for req in [r for r in queue if predicate(r)]:
        queue.remove(req)
        out.append(req)
    return out

  def in_flight_through(self, key: str) -> bool:  # a dispatched batch runs through `key`
    return any(n and key in k for k, n in self.in_flight.items())

  def forget_instance(self, key: str) -> None:
    """The instance `key` is gone (no request runs through it): its segments and queues too."""
    for k in [k for k in self.segments if key in k]:
      self.segments.pop(k)
      self.queues.pop(k, None)

  def drop_all(self, error: BaseException) -> None:  # every request ends with `error`
    for req in list(self.active) + [r for q in self.waiting.values() for r in q]:
      self.finish(req, "error", error)
    self.waiting.clear()
    for queue in self.queues.values():
      queue.clear()

  def has_work(self) -> bool:
    return bool(self.active) or self.num_waiting > 0


def _fits(req: Request, adapters, chunk: int) -> bool:
  """Whether the request's KV (in every layers instance of its chain) and adapter slot fit now."""
  if adapters is not None and not adapters.can_acquire(req.model):
    return False  # every bank slot is held by running requests of other adapters
  need = collections.Counter()
  pools = {}
  for seg in req.segments:
    for inst in seg.layers:
      need[inst.key] += 1
      pools[inst.key] = inst.pool
  return all(pools[k].can_lease(pools[k].lease_tokens(req.tokens_needed, chunk), n)
             for k, n in need.items())


def _oldest_waiting_for_adapter_slot(waiting, adapters) -> int | None:
  """Arrival of the oldest queue head whose adapter finds no bank slot, if any."""
  if adapters is None:
    return None
  return min((q[0].arrived for q in waiting.values()
              if q and not adapters.can_acquire(q[0].model)), default=None)
