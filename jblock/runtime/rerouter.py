"""Applies rerouting decisions (jblock.runtime.reroute) to the engine's running requests.

The scheduler calls `Rerouter.__call__(req)` at each step boundary, under the engine lock. For
a model with measured substitutions it computes the instances' loads, asks the policy for the
request's route and, when the route changes: leases KV in the instances the request enters
(releasing the ones it leaves), re-cuts its segments (runs of the model's own segments, with
each substituted position a segment of its own, so untouched runs keep batching with the
model's other requests), and coordinates the KV: pages copied from the instance the request
left (reuse) or a replay of its tokens (recompute, returned as True to the scheduler).

Replicas (jblock.runtime.replicas) go through the same machinery: at admission a request is
bound to the least loaded copy of each replicated block (its leases and segments moved there
before anything is cached), whatever its accuracy budget; rerouting then starts from the
request's bound chain. `unbind` moves requests off a draining copy (their KV is then replayed).
"""

import collections
import dataclasses
import functools
from typing import Any, Iterable, Mapping, Protocol

import jax

from jblock.blocks import LAYERS
from jblock.runtime import replicas as replicas_lib
from jblock.runtime import reroute
from jblock.runtime.kv import pages_for
from jblock.runtime.scheduler import Request, Scheduler
from jblock.runtime.segments import Segment


class ChainCatalog(Protocol):
  """What the rerouter reads of the engine's models (jblock.runtime.registry.Registry)."""
  instances: Mapping[str, Any]  # instance key -> instance

  def chain_of(self, model: str) -> tuple[list[str], list]: ...  # block ids, own instances
  def segments_of(self, model: str) -> list[Segment]: ...
  def all_segments(self) -> list[Segment]: ...  # every model's, to batch a route with theirs


class Rerouter:

  def __init__(self, config: reroute.RerouteConfig, scheduler: Scheduler, catalog: ChainCatalog,
               dispatch_lock, replicas: replicas_lib.Replicas | None = None):
    self.config = config
    self.replicas = replicas if replicas is not None else replicas_lib.Replicas()
    self._scheduler = scheduler
    self._catalog = catalog
    self._instances = catalog.instances  # key -> instance (with sharing, key == block id)
    self._dispatch_lock = dispatch_lock  # every dispatch swaps the KV pools a copy writes
    self.measured: dict[str, dict] = {}  # model -> {route: reroute.Measured}
    self.counts = collections.Counter()
    self.events: collections.deque = collections.deque(maxlen=1000)

  def set_records(self, model: str, chain: list[str], recs: Iterable[Mapping]) -> int:
    """The equivalence records the model's rerouting may use; returns how many routes they give."""
    self.measured.pop(model, None)
    measured = reroute.measured_routes(recs, chain)
    self.measured.update({model: measured} if measured else {})
    return len(measured)

  def drop_model(self, model: str) -> None:
    self.measured.pop(model, None)

  def stats(self) -> dict[str, Any]:
    return {"models": sorted(self.measured), **{k: self.counts[k] for k in (
        "moves", "routed_back", "kv_reused", "kv_recomputed", "steps_rerouted",
        "replica_bindings", "replica_unbound")}}

  # ---- the hook -----------------------------------------------------------------------------

  def __call__(self, req: Request) -> bool:
    if self.replicas and req.item is None and req.cached == 0 and not req.generated:
      self._bind(req)  # admission: nothing cached, any copy is free to take
    measured = self.measured.get(req.model)
    if not measured:
      return False
    chain, own = self._catalog.chain_of(req.model)
    own = [req.replicas.get(p, inst) for p, inst in enumerate(own)]
    decision = reroute.decide(chain, req.route, measured, req.accuracy_budget,
                              self._loads(req, chain, measured, own), self.config,
                              [i.kind for i in own], cached_tokens=req.cached,
                              remaining_tokens=req.params.max_new_tokens - len(req.generated))
    recompute = False
    if decision.route != req.route:
      recompute = self._move(req, chain, own, decision)
    if req.route:
      self.counts["steps_rerouted"] += 1
    return recompute

  def reroute_stalled(self) -> None:
    """Steps queued behind an instance that is not resident (being loaded or re-placed) are
    routed again at once rather than at their next step boundary."""
    if not self.measured:
      return
    sched = self._scheduler
    for key, queue in list(sched.queues.items()):
      seg = sched.segments[key]
      if not queue or all(i.available for i in seg.instances):
        continue
      for item in [it for it in queue if it.req.model in self.measured]:
        req = item.req
        before, start = req.route, _starts(req.segments)[item.pos]
        recompute = self(req)
        if req.route == before:
          continue
        queue.remove(item)
        req.item = None
        starts = _starts(req.segments)
        if not recompute and start in starts:  # its input is the hidden state entering `start`
          sched.requeue(dataclasses.replace(item, pos=starts.index(start)))
          continue
        if not recompute:
          self.counts["kv_recomputed"] += 1  # cut elsewhere: the step restarts from its tokens
        sched.resume(req)  # replay what it had cached (or restart its prompt)

  def through(self, exclude: Request | None = None) -> collections.Counter:
    """Instance key -> active requests whose chain runs through it."""
    out = collections.Counter()
    for r in self._scheduler.active:
      if r is not exclude:
        out.update({i.key for seg in r.segments for i in seg.instances})
    return out

  # ---- replicas -----------------------------------------------------------------------------

  def _bind(self, req: Request) -> None:
    """Binds a just admitted request to the least loaded copy of each replicated block."""
    adapters = self._scheduler.adapters
    if adapters is not None and adapters.is_adapter(req.model):
      return  # its adapter's bank slots live in the primaries
    own = [i for s in self._catalog.segments_of(req.model) for i in s.instances]
    through = self.through(exclude=req)
    chunk = self._scheduler.config.prefill_chunk

    def options_for(keys):
      insts = {k: self._instances[k] for k in keys if k in self._instances}
      opts = []
      for k, inst in insts.items():
        room = (inst.pool is None or k in req.leases
                or inst.pool.can_lease(inst.pool.lease_tokens(req.tokens_needed, chunk)))
        live = inst.available and not inst.lost_reason
        opts.append(replicas_lib.Option(k, through[k], inst.batch_size, room and live))
      return opts, insts

    binding = replicas_lib.bind(own, self.replicas, options_for)
    if binding and self._rebind(req, binding):
      self.counts["replica_bindings"] += 1

  def can_unbind(self, req: Request, keys: set[str]) -> bool:
    """Whether the instances `unbind` would move the request onto have KV room for it now."""
    chunk = self._scheduler.config.prefill_chunk
    targets = [inst for p, inst in enumerate(
        i for s in self._catalog.segments_of(req.model) for i in s.instances)
        if p in req.replicas and req.replicas[p].key in keys and dict(req.route).get(p) is None]
    need = collections.Counter(i.key for i in targets if i.kind == LAYERS)
    return all(self._instances[k].pool.can_lease(
        self._instances[k].pool.lease_tokens(req.tokens_needed, chunk),
        n - len(req.leases.get(k, []))) for k, n in need.items() if n > len(req.leases.get(k, [])))

  def unbind(self, req: Request, keys: set[str]) -> bool:
    """Moves a (paused) request off the copies `keys` onto its chain's own instances; False
    when their KV pools have no room for it now. The caller replays its KV."""
    binding = {p: i for p, i in req.replicas.items() if i.key not in keys}
    if not self._rebind(req, binding):
      return False
    self.counts["replica_unbound"] += 1
    return True

  def _rebind(self, req: Request, binding: dict[int, Any]) -> bool:
    """The request's chain becomes its model's own instances with `binding`'s copies and its
    current substitutions; leases, segments and page tables follow (all or nothing)."""
    own_segments = self._catalog.segments_of(req.model)
    own = [i for s in own_segments for i in s.instances]
    bound = [binding.get(p, inst) for p, inst in enumerate(own)]
    at = {p: self._instances[b] for p, b in req.route}
    new_chain = [at.get(p, inst) for p, inst in enumerate(bound)]
    if not self._acquire(req, new_chain):
      return False
    self._release(req, new_chain)
    req.replicas = dict(binding)
    req.segments = self._segments_for(req.model, at, self._bound_segments(own_segments, binding))
    req.tables = _tables(req)
    return True

  def _bound_segments(self, own: list[Segment], binding: Mapping[int, Any]) -> list[Segment]:
    """The model's segments with bound copies in place of its instances: a segment keeps its
    cut (a fused run of replicated blocks stays one call); one segment object per key."""
    if not binding:
      return own
    out, pos = [], 0
    for seg in own:
      insts = [binding.get(pos + j, inst) for j, inst in enumerate(seg.instances)]
      if all(a is b for a, b in zip(insts, seg.instances)):
        out.append(seg)
      else:
        new = Segment(insts, seg.start)
        out.append(self._scheduler.segments.setdefault(new.key, new))
      pos += len(seg.instances)
    return out

  def _loads(self, req: Request, chain, measured, own) -> dict[str, reroute.Load]:
    through = self.through(exclude=req)
    loads = {}
    for block in set(chain) | reroute.candidates_of(measured):
      inst = self._instances.get(block)
      if inst is None:
        continue
      resident = inst.available and not inst.lost_reason
      room = (inst.pool is None or block in req.leases
              or inst.pool.can_lease(inst.pool.lease_tokens(req.tokens_needed,
                                                            self._scheduler.config.prefill_chunk)))
      loads[block] = reroute.Load(through[block],
                                  self.config.overload_requests or inst.batch_size, resident, room)
    return loads

  def _move(self, req: Request, chain, own, decision: reroute.Decision) -> bool:
    """Moves the request onto the decision's route; True when its KV must be replayed."""
    at = {p: self._instances[b] for p, b in decision.route}
    new_chain = [at.get(p, inst) for p, inst in enumerate(own)]  # own: the bound chain
    if not self._acquire(req, new_chain):
      return False  # no KV room after all: stay on the current route
    old_chain = [i for seg in req.segments for i in seg.instances]
    copies, recompute = [], False
    for move in decision.moves:
      self.counts["moves"] += 1
      self.counts["routed_back"] += move.target == chain[move.position]
      if own[move.position].kind != LAYERS or req.cached == 0:
        continue  # no KV there, or none written yet
      src, dst = old_chain[move.position], new_chain[move.position]
      if move.kv == reroute.REUSE and src.local and dst.local:  # pages copied on this mesh
        copies.append((src, dst))
      else:
        recompute = True
    first = min((m.position for m in decision.moves), default=len(own))
    if not self._scheduler.detach_prefix(req, first, recompute or req.cached == 0):
      self._release(req, old_chain)  # no KV room to un-share its prefix: stay on the route
      return False
    if recompute:
      self.counts["kv_recomputed"] += 1
    elif copies:
      for src, dst in copies:
        self._copy_kv(req, src, dst)
      self.counts["kv_reused"] += 1
    self._release(req, new_chain)
    req.segments = self._segments_for(req.model, at, self._bound_segments(
        self._catalog.segments_of(req.model), req.replicas))
    req.tables = _tables(req)
    req.route = decision.route
    self.events.append({"request": req.handle.request_id, "tenant": req.tenant,
                        "budget": req.accuracy_budget, "generated": len(req.generated),
                        "route": sorted(decision.route), "cost": decision.cost,
                        "kv": "recompute" if recompute else ("reuse" if copies else "none"),
                        "moves": [(m.position, m.source, m.target) for m in decision.moves]})
    return recompute

  def _acquire(self, req: Request, new_chain: list) -> bool:
    """Leases KV in the instances the request enters (all or none)."""
    need = collections.Counter(i.key for i in new_chain if i.kind == LAYERS)
    chunk = self._scheduler.config.prefill_chunk
    fresh = []
    for key, n in need.items():
      inst = self._instances[key]
      for _ in range(n - len(req.leases.get(key, []))):
        tokens = inst.pool.lease_tokens(req.tokens_needed, chunk)
        if not inst.pool.can_lease(tokens):
          for k, lease in fresh:
            lease.release()
            req.leases[k].remove(lease)
            if not req.leases[k]:
              del req.leases[k]
          return False
        lease = inst.pool.lease(req.handle.request_id, tokens)
        req.leases.setdefault(key, []).append(lease)
        fresh.append((key, lease))
    return True

  def _release(self, req: Request, new_chain: list) -> None:
    """Frees the leases of the instances the request left (their pages go back to the pool)."""
    need = collections.Counter(i.key for i in new_chain if i.kind == LAYERS)
    for key in list(req.leases):
      leases = req.leases[key]
      while len(leases) > need.get(key, 0):
        leases.pop().release()
      if not leases:
        del req.leases[key]

  def _segments_for(self, model: str, at: Mapping[int, Any],
                    own: list[Segment] | None = None) -> list[Segment]:
    """The request's new chain of instances cut into segments: at each position the longest
    segment the engine already runs that starts there with the same instances (the model's own,
    or another model's — a route onto the base's blocks batches with the base's requests in the
    base's fused call, compiled shapes included); where none does, the rest of the model's own
    segment up to the next substituted position, or the substituted instance alone. `own`: the
    request's bound segments (replicas in place), else the model's."""
    own = own if own is not None else self._catalog.segments_of(model)
    if not at:
      return own
    chain = [i for s in own for i in s.instances]
    new = [at.get(p, inst) for p, inst in enumerate(chain)]
    own_end = {}  # position -> end of the own segment covering it
    pos = 0
    for s in own:
      for p in range(pos, pos + len(s.instances)):
        own_end[p] = pos + len(s.instances)
      pos += len(s.instances)
    known: dict[tuple[int, str], dict[tuple[str, ...], Segment]] = {}
    for s in [*own, *self._catalog.all_segments(), *self._scheduler.segments.values()]:
      known.setdefault((s.start, s.key[0]), {}).setdefault(s.key, s)
    out, p = [], 0
    while p < len(new):
      fits = [s for s in known.get((p, new[p].key), {}).values()
              if list(s.key) == [i.key for i in new[p:p + len(s.instances)]]]
      if fits:
        best = max(fits, key=lambda s: len(s.instances))
      else:
        end = p + 1
        if p not in at:  # untouched: as far as its own segment goes without a substitution
          while end < own_end[p] and end not in at:
            end += 1
        best = Segment(new[p:end], p)
        key = best.key
        best = self._scheduler.segments.get(key, best)
        known.setdefault((p, key[0]), {})[key] = best
      out.append(best)
      p += len(best.instances)
    return out

  def _copy_kv(self, req: Request, src, dst) -> None:
    """The pages the request's cached tokens wrote in `src`, written into its pages in `dst`."""
    src_lease, dst_lease = req.leases[src.key][0], req.leases[dst.key][-1]
    n = min(pages_for(req.cached, dst.pool.page_size), len(dst_lease.pages), len(src_lease.pages))
    if n == 0:
      return
    s_pages = jax.numpy.asarray(src_lease.pages[:n], jax.numpy.int32)
    d_pages = jax.numpy.asarray(dst_lease.pages[:n], jax.numpy.int32)
    with self._dispatch_lock:  # every dispatch swaps the pools
      dst.kv = {k: jax.device_put(_copy_pages(dst.kv[k], src.kv[k], d_pages, s_pages),
                                  dst.kv_sharding) for k in ("k", "v")}


def _starts(segments: list[Segment]) -> list[int]:
  """The chain position each segment starts at."""
  out, pos = [], 0
  for s in segments:
    out.append(pos)
    pos += len(s.instances)
  return out


def _tables(req: Request) -> list[list]:
  used = collections.Counter()
  tables = []
  for seg in req.segments:
    row = []
    for inst in seg.layers:
      row.append(req.leases[inst.key][used[inst.key]])
      used[inst.key] += 1
    tables.append(row)
  return tables


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_pages(dst, src, dst_pages, src_pages):
  return dst.at[:, dst_pages].set(src[:, src_pages])
