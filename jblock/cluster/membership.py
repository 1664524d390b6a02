"""The coordinator's view of its workers: who joined, who is alive, what each holds.

Workers register at any time and then send a heartbeat every `heartbeat_interval_s` with their
device memory and load. A worker is declared dead when `dead_after_s` pass without a heartbeat,
or at once when an RPC to it fails (`mark_dead`); listeners registered with `on_dead` are told
(the engine re-places the worker's blocks). A dead worker stays dead: its next heartbeat gets
FAILED_PRECONDITION and the worker exits (a restarted worker registers afresh). A heartbeat from
a worker this registry never saw (the coordinator restarted) gets NOT_FOUND: the worker registers
again, listing the blocks it still hosts (`hosted`), so they are placed where they are.
"""

import dataclasses
import threading
import time
import uuid
from typing import Any, Callable

import grpc

from jblock.cluster import validate
from jblock.errors import UnavailableError
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc

ALIVE, DEAD = "alive", "dead"


@dataclasses.dataclass(frozen=True)
class MembershipConfig:
  heartbeat_interval_s: float = 0.5  # how often workers send a heartbeat
  dead_after_s: float = 3.0  # silence after which a worker is declared dead


@dataclasses.dataclass
class Member:
  worker_id: str
  address: str  # host:port of its BlockHost service
  joined: float  # time.time() of its registration
  last_heartbeat: float  # time.monotonic() of the latest heartbeat (or registration)
  state: str = ALIVE
  reason: str = ""  # why it was declared dead
  devices: list[dict] = dataclasses.field(default_factory=list)
  load: dict = dataclasses.field(default_factory=dict)
  hosted: tuple[str, ...] = ()  # blocks it hosted when it registered (outliving a coordinator)

  def view(self, now: float) -> dict[str, Any]:
    return {"worker_id": self.worker_id, "address": self.address, "state": self.state,
            "reason": self.reason, "seconds_since_heartbeat": round(now - self.last_heartbeat, 2),
            "devices": self.devices, "load": self.load}


def _devices(devices) -> list[dict]:
  return [{"id": d.id, "platform": d.platform, "kind": d.kind, "memory_bytes": d.memory_bytes,
           "memory_limit_bytes": d.memory_limit_bytes} for d in devices]


class Membership(pb_grpc.RegistryServicer):
  """The Registry service and the liveness of every worker."""

  def __init__(self, config: MembershipConfig | None = None):
    self.config = config or MembershipConfig()
    self._members: dict[str, Member] = {}  # worker id -> member
    self._cond = threading.Condition()
    self._listeners: list[Callable[[str, str], None]] = []  # (address, reason)
    self._join_listeners: list[Callable[[str], None]] = []  # (address)
    self._stop = threading.Event()
    self._monitor = threading.Thread(target=self._watch, name="jblock-membership", daemon=True)
    self._monitor.start()

  # ---- the Registry service ----------------------------------------------------------------

  def Register(self, request, context):
    validate.or_abort(context, validate.register, request)
    if not request.address:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, "address: the worker's host:port is required")
    worker_id = request.worker_id or f"worker-{uuid.uuid4().hex[:8]}"
    with self._cond:
      old = self._members.get(worker_id)
      if old is not None and old.state == ALIVE and old.address != request.address:
        context.abort(grpc.StatusCode.ALREADY_EXISTS,
                      f"worker_id: {worker_id!r} is registered at {old.address}")
      self._members[worker_id] = Member(worker_id, request.address, time.time(), time.monotonic(),
                                        devices=_devices(request.devices),
                                        hosted=tuple(request.hosted_blocks))
      self._cond.notify_all()
      listeners = list(self._join_listeners)
    for listener in listeners:
      listener(request.address)
    return pb.RegisterResponse(worker_id=worker_id,
                               heartbeat_interval_s=self.config.heartbeat_interval_s)

  def Heartbeat(self, request, context):
    validate.or_abort(context, validate.heartbeat, request)
    with self._cond:
      member = self._members.get(request.worker_id)
      if member is None:  # this registry started after the worker joined: it registers again
        context.abort(grpc.StatusCode.NOT_FOUND,
                      f"worker_id: {request.worker_id!r} is not a member; register again")
      if member.state != ALIVE:  # its blocks were moved: it must not come back under this id
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"worker_id: {request.worker_id!r} was declared dead: {member.reason}")
      member.last_heartbeat = time.monotonic()
      member.devices = _devices(request.devices) or member.devices
      load = request.load
      member.load = {"blocks_hosted": load.blocks_hosted, "resident_bytes": load.resident_bytes,
                     "kv_bytes": load.kv_bytes, "batches_run": load.batches_run,
                     "batches_running": load.batches_running, "mailbox_rows": load.mailbox_rows,
                     "mailbox_bytes": load.mailbox_bytes, "blocks_loaded": load.blocks_loaded}
    return pb.HeartbeatResponse()

  # ---- liveness -------------------------------------------------------------------------------

  def on_dead(self, listener: Callable[[str, str], None]) -> None:
    """listener(address, reason) runs (on the caller's or the monitor's thread) once per death."""
    with self._cond:
      self._listeners.append(listener)

  def on_join(self, listener: Callable[[str], None]) -> None:
    with self._cond:
      self._join_listeners.append(listener)

  def mark_dead(self, address: str, reason: str) -> bool:
    """Declares the live worker at `address` dead; False when none was alive there."""
    with self._cond:
      members = [m for m in self._members.values() if m.address == address and m.state == ALIVE]
      for m in members:
        m.state, m.reason = DEAD, reason
      listeners = list(self._listeners)
    for _ in members[:1]:
      for listener in listeners:
        listener(address, reason)
    return bool(members)

  def _watch(self) -> None:
    while not self._stop.wait(min(0.25, self.config.heartbeat_interval_s)):
      now = time.monotonic()
      with self._cond:
        silent = [m for m in self._members.values()
                  if m.state == ALIVE and now - m.last_heartbeat > self.config.dead_after_s]
      for m in silent:
        self.mark_dead(m.address, f"no heartbeat for {now - m.last_heartbeat:.1f}s")

  def alive(self) -> list[str]:
    """Addresses of the live workers, in order of joining."""
    with self._cond:
      return [m.address for m in sorted(self._members.values(), key=lambda m: m.joined)
              if m.state == ALIVE]

  def is_alive(self, address: str) -> bool:
    return address in self.alive()

  def wait_for(self, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    with self._cond:
      while True:
        alive = [m for m in self._members.values() if m.state == ALIVE]
        if len(alive) >= count:
          return [m.address for m in sorted(alive, key=lambda m: m.joined)][:count]
        left = deadline - time.monotonic()
        if left <= 0:
          raise UnavailableError(f"{len(alive)} of {count} workers registered within {timeout}s")
        self._cond.wait(min(left, 0.5))

  def hosted(self) -> dict[str, list[str]]:
    """Block id -> live workers that hosted it when they registered (blocks that outlived the
    coordinator), in order of joining."""
    out: dict[str, list[str]] = {}
    with self._cond:
      for m in sorted(self._members.values(), key=lambda m: m.joined):
        if m.state == ALIVE:
          for block in m.hosted:
            out.setdefault(block, []).append(m.address)
    return out

  def stats(self) -> list[dict[str, Any]]:
    now = time.monotonic()
    with self._cond:
      return [m.view(now) for m in sorted(self._members.values(), key=lambda m: m.joined)]

  def stop(self) -> None:
    self._stop.set()
