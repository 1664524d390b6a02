"""When placements fail or change: instances re-placed with their requests' KV replayed, and
block replicas added or dropped (jblock.runtime.replicas).

Every change of request state goes through the scheduler's commands (pause, resume, finish,
take_waiting); RPCs to workers (re-hosting, unhosting) run outside the engine lock, and waits
under it are Condition waits that release it.
"""

import collections
import threading
import time
from typing import Callable

from jblock.blocks import HEAD, Block
from jblock.errors import InvalidRequestError, NotFoundError, UnavailableError
from jblock.runtime import replay
from jblock.runtime import replicas as replicas_lib
from jblock.runtime.executor import start_thread
from jblock.runtime.registry import Registry
from jblock.runtime.rerouter import Rerouter
from jblock.runtime.scheduler import Request, RequestOutput, Scheduler


class Recovery:
  """Re-placement after losses, moves, and replicas of shared blocks."""

  def __init__(self, lock: threading.Condition, scheduler: Scheduler, registry: Registry,
               rerouter: Rerouter, replicas: replicas_lib.Replicas,
               deliver: Callable[[list[RequestOutput]], None], closed: Callable[[], bool]):
    self._lock = lock
    self._scheduler = scheduler
    self._registry = registry
    self._rerouter = rerouter
    self._replicas = replicas
    self._deliver = deliver
    self._closed = closed
    self.events: collections.deque = collections.deque(maxlen=32)  # latest placement losses

  def placement_lost(self, placement: str, reason: str) -> None:
    """The instances at `placement` (an executor key: a worker) lost their state. The requests
    through them pause; on another thread each instance is re-placed (`inst.recover`), then the
    requests replay their KV there and go on (jblock.runtime.replay). Requests through an
    instance that cannot be re-placed fail with UnavailableError naming why. A replica there,
    and every replica of a primary there, is dropped instead (its requests replay onto the
    primary, and its worker may take the primary). Idempotent."""
    with self._lock:
      if self._closed():
        return  # shutting down: the workers going quiet is expected
      lost = [i for i in self._registry.instances.values() if i.remote
              and i.executor_key == placement and i.available]
      copies = sorted({k for i in lost for k in self._replicas.of(i.key)} | {
          i.key for i in lost if i.key in self._replicas.of(replicas_lib.block_of(i.key))})
      for key in copies:
        self._registry.instances[key].available = False
        self._replicas.draining.add(key)
      replay.pause_all(self._scheduler, set(copies))  # their in-flight results are stale now
      lost = [i for i in lost if i.key not in copies]

      def drop_copies():
        for key in copies:
          try:
            self.drop_replica(key, timeout=0.0)
          except NotFoundError:
            pass  # removed meanwhile (another loss, a re-plan)

      if lost:
        self._replace(lost, placement, reason, before=drop_copies)
      elif copies:
        start_thread(drop_copies, "jblock-drop-replicas")

  def relocate(self, keys, reason: str, to: str | None = None) -> threading.Thread | None:
    """Moves instances (by key) to another placement (`to` first, if given): a new copy is
    hosted there and the old one freed, while the requests through them pause and then replay
    their KV into the new copy. Returns the thread doing it (join it to wait)."""
    with self._lock:
      instances = self._registry.instances
      moving = [instances[k] for k in keys
                if k in instances and instances[k].remote and instances[k].available]
      return self._replace(moving, ",".join(sorted({i.executor_key for i in moving})), reason, to)

  def _replace(self, instances: list, placement: str, reason: str,
               to: str | None = None, before: Callable[[], None] = lambda: None
               ) -> threading.Thread | None:
    """Under the lock: pauses the requests through `instances` and starts re-placing them (after
    `before`, on the same thread)."""
    if not instances:
      return None
    for inst in instances:
      inst.available = False
    affected = replay.pause_all(self._scheduler, {i.key for i in instances})
    event = {"placement": placement, "reason": reason, "blocks": len(instances),
             "requests_paused": len(affected), "at": time.time()}
    self.events.append(event)
    return start_thread(lambda: (before(), self._recover(instances, affected, reason, event, to)),
                        "jblock-recover")

  # ---- replicas (jblock.runtime.replicas) -----------------------------------------------------

  def add_replica(self, block_id: str, key: str | None = None) -> str:
    """Hosts another copy of a served block under `key` (`<block_id>#n`; the next free one if
    None) through the instance factory (a remote one places it on the worker its placer plans
    for that key); new requests are then balanced over the copies. Returns the key."""
    with self._lock:
      primary = self._registry.instances.get(block_id)
      if not self._registry.sharing or primary is None:
        raise NotFoundError(f"block {block_id[:12]} is not a shared block of this engine")
      key = key or replicas_lib.next_key(block_id, self._registry.instances)
      if replicas_lib.block_of(key) != block_id or key == block_id or key in self._registry.instances:
        raise InvalidRequestError("key", f"{key!r} is not a free replica key of {block_id[:12]}")
      spec, chain = next((s, c) for s, c in self._registry.models.values() if primary in c)
      block = spec.chain[chain.index(primary)]
      if primary.local:  # a local copy shares the primary's weight buffers
        block = Block(block.kind, block.config, primary.params)
      tied = block.kind == HEAD and block.config.get("tied_to")
      table = chain[0].embed_table if tied else None
    inst = self._registry.new_instance(key, block, block_id, primary.batch_size, table)  # no lock: RPCs
    with self._lock:
      inst.models = primary.models  # the same set: unloading the models frees every copy
      self._registry.instances[key] = inst
      self._replicas.add(block_id, key)
      self._lock.notify_all()
    return key

  def drop_replica(self, key: str, timeout: float = 30.0, move_s: float = 60.0) -> dict:
    """Removes a replica: no new request is bound to it, its requests finish there for up to
    `timeout` seconds, the rest move onto the primary with a KV replay (for up to `move_s` more
    while the primary's KV pool has no room), then it is unhosted (params and KV freed)."""
    with self._lock:
      if key not in self._replicas.of(replicas_lib.block_of(key)) or key in self._replicas.removing:
        raise NotFoundError(f"{key!r} is not a replica served by this engine (or is being removed)")
      self._replicas.removing.add(key)
      self._replicas.draining.add(key)
      sched, t0 = self._scheduler, time.monotonic()
      moved = 0

      def through():
        return [r for r in sched.active if replay.uses(r, {key})]

      while through() and time.monotonic() < t0 + timeout:
        self._lock.wait(timeout=0.05)
      while through() and time.monotonic() < t0 + timeout + move_s:
        for req in [r for r in through() if self._rerouter.can_unbind(r, {key})]:
          replay.pause(sched, req)
          moved += self._rerouter.unbind(req, {key})
          replay.resume(sched, req)  # its KV replayed on the primary (towards the same target)
        if through():
          self._lock.wait(timeout=0.05)
      for req in through():
        sched.finish(req, "error", UnavailableError(
            f"replica {key[:16]} was removed and its primary had no KV room for the request"))
      self._deliver(sched.take_outputs())
      while (sched.in_flight_through(key)  # stale batches come back
             and time.monotonic() < t0 + timeout + 2 * move_s):
        self._lock.wait(timeout=0.05)
      inst = self._registry.instances.pop(key)
      self._replicas.remove(key)
      sched.forget_instance(key)  # no request runs through it now
      drained_s = time.monotonic() - t0
      self._lock.notify_all()
    inst.close()  # a remote copy: UnhostBlock on its worker
    return {"key": key, "requests_moved": moved, "drain_s": round(drained_s, 3)}

  def retry_lost(self) -> None:
    """Tries again to place the instances that found no worker (say, when a worker joins)."""
    with self._lock:
      lost = [i for i in self._registry.instances.values() if i.lost_reason]
      for inst in lost:
        inst.lost_reason = ""
    if lost:
      start_thread(lambda: self._recover(lost, [], "re-placed when a worker joined"),
                   "jblock-recover")

  def _recover(self, lost: list, affected: list[Request], reason: str,
               event: dict | None = None, to: str | None = None) -> None:
    t0 = time.perf_counter()
    failed: dict[str, Exception] = {}
    for inst in lost:  # RPCs: outside the lock, serving goes on meanwhile
      try:
        inst.recover(reason, to)
      except Exception as e:
        failed[inst.key] = e
    with self._lock:
      for inst in lost:
        inst.available = inst.key not in failed
        if inst.pool is not None:
          inst.pool.drop_cache()  # re-hosted empty: its registered prefixes are gone
      doomed = [r for r in list(self._scheduler.active) if replay.uses(r, set(failed))]
      for req in doomed:
        if req not in affected:
          replay.pause(self._scheduler, req)
      # Waiting requests through an instance that found no placement would wait forever.
      doomed += self._scheduler.take_waiting(lambda r: replay.uses(r, set(failed)))
      replayed = 0
      for req in set(affected) | set(doomed):
        bad = next((k for k in failed if replay.uses(req, {k})), None)
        if bad is not None:
          self._scheduler.finish(req, "error", UnavailableError(str(failed[bad])))
        elif not req.done and req.item is None:  # (a dropped replica's may be queued already)
          replayed += req.cached  # tokens whose KV the replay writes again
          replay.resume(self._scheduler, req)
      self._deliver(self._scheduler.take_outputs())
      if event is not None:
        event.update(rehost_s=round(time.perf_counter() - t0, 3), blocks_unplaced=len(failed),
                     requests_failed=sum(1 for r in set(affected) | set(doomed)
                                         if r.handle.finish_reason == "error"),
                     tokens_replayed=replayed)
      self._lock.notify_all()
