"""A jblock worker: hosts block instances from its zoo and runs them for the coordinator.

  python -m launch.worker --coordinator=127.0.0.1:50060 --zoo=checkpoints/zoo [--port=0]

Registers (the coordinator may start before or after it), then sends heartbeats. If the
coordinator dies, the worker keeps its blocks and KV pools and retries; a restarted coordinator
(same zoo and flags) takes it back with the blocks it hosts, loading nothing again. It exits by
itself (status 3) when no coordinator has answered for --coordinator_timeout_s, or when the
coordinator declared it dead (its blocks were moved).

Credentials: with no flags, the worker uses the cluster token the coordinator made in
`<zoo>/cluster.token` (same host, same --zoo; it waits for the file when started first). On
another host, copy that file (it is the cluster's key: keep it mode 0600) and pass it as
--cluster_token_file, or use mutual TLS (--tls_cert, --tls_key, --tls_ca) on every member. The
worker answers only callers that present the credentials, and presents them when it registers.
--insecure_cluster (on the coordinator and every worker) turns the checks off, 127.0.0.1 only.
"""

import signal
import sys
import threading
import uuid

import grpc
from absl import app
from absl import flags

from jblock.cluster import heartbeat
from jblock.cluster import security
from jblock.zoo.cli import quiet_libraries
from jblock.serving import worker
from launch import cluster_flags
from launch.console import run_script

_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of the coordinator's registry.")
_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Block zoo directory (same blocks as the coordinator's).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on and advertise (not "
                            "loopback: needs --cluster_token_file or --tls_*).")
_PORT = flags.DEFINE_integer("port", 0, "Worker service port; 0 picks a free one.", lower_bound=0)
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", [], "data,model device mesh; empty = all devices.")
_REGISTER_TIMEOUT_S = flags.DEFINE_float("register_timeout_s", 120.0,
                                         "How long to wait for the coordinator at start-up.",
                                         lower_bound=0.1)
_COORDINATOR_TIMEOUT_S = flags.DEFINE_float(
    "coordinator_timeout_s", heartbeat.COORDINATOR_TIMEOUT_S, "How long to keep the blocks and "
    "wait for a coordinator that stopped answering (it may be restarting); then exit.",
    lower_bound=0.1)
_MAILBOX_BYTES = flags.DEFINE_integer(
    "mailbox_bytes", 1 << 30, "Hidden rows kept for this worker's next batches, at most; past "
    "it rows go back through the coordinator.", lower_bound=0)
_HOP_LATENCY_MS = flags.DEFINE_float(
    "hop_latency_ms", 0.0, "Benchmarks: a sleep before each worker-to-worker PutRows (stands "
    "for a slower link).", lower_bound=0.0)
flags.mark_flag_as_required("coordinator")

ORPHANED = 3  # exit status of a worker whose coordinator is gone


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_libraries()
  mesh = tuple(int(v) for v in _MESH_SHAPE.value) if _MESH_SHAPE.value else None
  creds = cluster_flags.credentials(_ZOO.value, wait_s=_REGISTER_TIMEOUT_S.value,
                                    progress=lambda line: print(line, file=sys.stderr, flush=True))
  notes = []  # said on the "serving on" line: scripts read that one line
  bind = cluster_flags.bind_host(_HOST.value, creds, "the worker", log=notes.append)
  server, port, host = worker.start_worker_server(
      _ZOO.value, _PORT.value, bind, mesh, creds, mailbox_bytes=_MAILBOX_BYTES.value,
      push_delay_s=_HOP_LATENCY_MS.value / 1e3)
  address = f"{bind}:{port}"
  stop = threading.Event()
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: stop.set())
  worker_id = f"worker-{uuid.uuid4().hex[:8]}"

  def rejoin():  # a restarted coordinator: join it with the blocks hosted here
    host.forget_coordinator()
    return heartbeat.register(channel, worker_id, address, timeout=_REGISTER_TIMEOUT_S.value,
                              hosted=host.hosted_blocks())

  def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)

  with security.channel(_COORDINATOR.value, creds) as channel:
    try:
      joined = heartbeat.register(channel, worker_id, address, timeout=_REGISTER_TIMEOUT_S.value)
    except grpc.RpcError as e:
      say(f"jblock: worker could not register with {_COORDINATOR.value}: "
          f"{e.code().name}: {e.details()}")
      server.stop(0)
      sys.exit(ORPHANED)
    print(f"jblock: worker serving on {address} as {joined.worker_id}"
          + "".join(f"; {n.removeprefix('jblock: ')}" for n in notes), flush=True)
    why = heartbeat.run(channel, joined.worker_id, joined.heartbeat_interval_s or 0.5, host.load,
                        stop, _COORDINATOR_TIMEOUT_S.value, rejoin=rejoin, progress=say)
  server.stop(5).wait()
  if why != "stopped":
    print(f"jblock: worker exiting: {why}", file=sys.stderr, flush=True)
    sys.exit(ORPHANED)


if __name__ == "__main__":
  run_script(main, __name__)
