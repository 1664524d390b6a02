"""Helpers shared by the serving tests (bounded polling, free ports, a cluster's clean-up)."""

import socket
import time

from jblock.bench.servers import stop_process


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01):
  """Polls `predicate` until it returns a truthy value; fails the test after `timeout`."""
  deadline = time.monotonic() + timeout
  while True:
    value = predicate()
    if value:
      return value
    if time.monotonic() > deadline:
      raise AssertionError(f"condition not met within {timeout}s")
    time.sleep(interval)


def kv_slots_used(stats: dict) -> dict[str, int]:
  """KV leases in use per layers block (the only blocks that hold KV)."""
  return {block["block_id"]: block["kv_slots_used"] for block in stats["blocks"]
          if block["kind"] == "layers"}


def stop_cluster(server, engine, procs) -> None:
  """Stops a test cluster whatever state it is in: coordinator, engine, worker processes."""
  if server is not None:
    server.stop(0)
  if engine is not None:
    engine.close()
  for p in procs:
    stop_process(p)
