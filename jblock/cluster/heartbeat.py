"""A worker's side of membership: register, then heartbeat until told to stop or orphaned.

A coordinator may die and be restarted. While heartbeats fail the worker keeps its blocks and
KV pools and keeps trying, backing off to one try every `MAX_BACKOFF_S`; when a coordinator
answers that it does not know the worker (NOT_FOUND: it restarted), the worker registers again
through `rejoin`, listing the blocks it hosts, and the new coordinator places them where they
are. A worker that the coordinator declared dead (FAILED_PRECONDITION: its blocks were moved)
or whose coordinator stayed away for `coordinator_timeout_s` has nothing left to serve, so
`run` returns and the worker process exits.
"""

import threading
import time
from typing import Callable, Sequence

import grpc
import jax

from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc


def devices_now() -> list[pb.Device]:
  """This process's devices with their memory in use and limit where the platform says."""
  out = []
  for d in jax.local_devices():
    try:
      mem = d.memory_stats() or {}
    except Exception:  # some platforms have no memory stats
      mem = {}
    out.append(pb.Device(id=d.id, platform=d.platform, kind=d.device_kind,
                         memory_bytes=int(mem.get("bytes_in_use", 0)),
                         memory_limit_bytes=int(mem.get("bytes_limit", 0))))
  return out


MAX_BACKOFF_S = 1.0  # longest pause between tries while the coordinator is away
COORDINATOR_TIMEOUT_S = 300.0  # default: how long a worker waits for a coordinator to return


def register(channel: grpc.Channel, worker_id: str, address: str, timeout: float = 60.0,
             hosted: Sequence[str] = ()) -> pb.RegisterResponse:
  """Registers with the coordinator, waiting (bounded) until it is up. `hosted`: blocks this
  worker already holds (after its coordinator restarted)."""
  return pb_grpc.RegistryStub(channel).Register(
      pb.RegisterRequest(worker_id=worker_id, address=address, devices=devices_now(),
                         hosted_blocks=list(hosted)),
      timeout=timeout, wait_for_ready=True)


def run(channel: grpc.Channel, worker_id: str, interval_s: float,
        load: Callable[[], pb.WorkerLoad], stop: threading.Event,
        coordinator_timeout_s: float = COORDINATOR_TIMEOUT_S,
        rejoin: Callable[[], pb.RegisterResponse] | None = None,
        progress: Callable[[str], None] = lambda _: None) -> str:
  """Heartbeats until `stop` is set or the coordinator is lost; returns why it ended.
  `rejoin()` registers again with a coordinator that does not know this worker (None: such an
  answer ends the loop)."""
  stub = pb_grpc.RegistryStub(channel)
  last_ok = time.monotonic()
  pause, away = interval_s, False
  while not stop.wait(pause):
    try:
      stub.Heartbeat(pb.HeartbeatRequest(worker_id=worker_id, devices=devices_now(), load=load()),
                     timeout=max(interval_s, 1.0))
      if away:
        progress("jblock: the coordinator answers again")
      last_ok, pause, away = time.monotonic(), interval_s, False
      continue
    except grpc.RpcError as e:
      error = e
    if error.code() == grpc.StatusCode.FAILED_PRECONDITION or (
        error.code() == grpc.StatusCode.NOT_FOUND and rejoin is None):
      return f"the coordinator dropped this worker: {error.details()}"
    if error.code() == grpc.StatusCode.NOT_FOUND:  # a restarted coordinator: join it
      try:
        interval_s = rejoin().heartbeat_interval_s or interval_s
        progress("jblock: registered again with a restarted coordinator")
        last_ok, pause, away = time.monotonic(), interval_s, False
        continue
      except grpc.RpcError as e:
        error = e
    if time.monotonic() - last_ok > coordinator_timeout_s:
      return (f"no answer from the coordinator for {coordinator_timeout_s:.0f}s "
              f"({error.code().name})")
    if not away:
      progress(f"jblock: the coordinator does not answer ({error.code().name}); keeping the "
               f"blocks and retrying for up to {coordinator_timeout_s:.0f}s")
    pause, away = min(max(pause * 2, 0.05), MAX_BACKOFF_S), True
  return "stopped"
