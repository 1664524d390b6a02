"""Helpers shared by the serving tests (bounded polling, free ports, workers in this process,
a cluster's clean-up)."""

import socket
import threading
import time

from jblock.bench.servers import stop_process


class InProcessWorkers:
  """Workers served by this process, each registered with `registry` (host:port) and sending
  heartbeats; close() stops them all."""

  def __init__(self, zoo_dir: str, registry: str, credentials=None):
    self.zoo_dir, self.registry, self.credentials = zoo_dir, registry, credentials
    self.stop = threading.Event()
    self.threads: list[threading.Thread] = []
    self.servers = []

  def join(self) -> str:
    """Starts one more worker; returns its address."""
    from jblock.cluster import heartbeat, security
    from jblock.serving.worker import start_worker_server
    server, port, host = start_worker_server(self.zoo_dir, 0, "127.0.0.1", (1, 1),
                                             self.credentials)
    self.servers.append(server)
    address = f"127.0.0.1:{port}"

    def member():
      with security.channel(self.registry, self.credentials) as channel:
        joined = heartbeat.register(channel, "", address, timeout=60)
        heartbeat.run(channel, joined.worker_id, 0.2, host.load, self.stop, 30.0)

    self.threads.append(threading.Thread(target=member, daemon=True))
    self.threads[-1].start()
    return address

  def close(self) -> None:
    self.stop.set()
    for t in self.threads:
      t.join(10)
    for server in self.servers:
      server.stop(0)


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
