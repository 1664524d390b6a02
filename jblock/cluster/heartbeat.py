"""A worker's side of membership: register, then heartbeat until told to stop or orphaned.

A worker whose coordinator is gone (heartbeats failing for `coordinator_timeout_s`) or that the
coordinator no longer counts as a member (NOT_FOUND: it was declared dead and its blocks moved)
has nothing left to serve, so `run` returns and the worker process exits.
"""

import threading
import time
from typing import Callable

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


def register(channel: grpc.Channel, worker_id: str, address: str,
             timeout: float = 60.0) -> pb.RegisterResponse:
  """Registers with the coordinator, waiting (bounded) until it is up."""
  return pb_grpc.RegistryStub(channel).Register(
      pb.RegisterRequest(worker_id=worker_id, address=address, devices=devices_now()),
      timeout=timeout, wait_for_ready=True)


def run(channel: grpc.Channel, worker_id: str, interval_s: float,
        load: Callable[[], pb.WorkerLoad], stop: threading.Event,
        coordinator_timeout_s: float = 10.0) -> str:
  """Heartbeats until `stop` is set or the coordinator is lost; returns why it ended."""
  stub = pb_grpc.RegistryStub(channel)
  last_ok = time.monotonic()
  while not stop.wait(interval_s):
    try:
      stub.Heartbeat(pb.HeartbeatRequest(worker_id=worker_id, devices=devices_now(), load=load()),
                     timeout=max(interval_s, 1.0))
      last_ok = time.monotonic()
    except grpc.RpcError as e:
      if e.code() == grpc.StatusCode.NOT_FOUND:
        return f"the coordinator dropped this worker: {e.details()}"
      if time.monotonic() - last_ok > coordinator_timeout_s:
        return (f"no answer from the coordinator for {coordinator_timeout_s:.0f}s "
                f"({e.code().name})")
  return "stopped"
