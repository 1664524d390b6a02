"""The jblock coordinator with blocks on worker processes.

  python -m launch.coordinator --zoo=DIR --num_workers=2 --registry_port=50060 --port=50051
  python -m launch.worker --coordinator=127.0.0.1:50060 --zoo=DIR     # once per worker

Waits for the workers to register, places the blocks on them by locality (a cross-worker hop
costs --placement_hop_cost_s per step, a block's compute its bytes / --placement_bytes_per_s;
the planner weighs the hops against the busiest worker's compute under each worker's memory;
`tools.client stats` shows the plan and its reasons), then serves the client API. Workers may
join later (the placement is re-planned: --replan_on_join) and keep sending heartbeats; a
worker silent for --dead_after_s (or whose RPC fails) is declared dead and its blocks are
re-placed on the others, its requests replaying their KV there. SIGTERM drains as launch.serve
does.

The coordinator may die: its workers keep their blocks and register again when it is restarted
with the same zoo and flags, and it places the blocks where they are (nothing is loaded again).
Requests in flight when it died fail with UNAVAILABLE; jblock.client retries them once the
coordinator is back, when nothing of them had been streamed yet.

Internal RPCs carry the cluster token and/or use mutual TLS (--tls_cert, --tls_key, --tls_ca;
the client port serves TLS with the same certificate). With neither flag, the token is made in
`<zoo>/cluster.token` (mode 0600, reused on restart) and workers on this host with the same
--zoo read it; --insecure_cluster turns the checks off and listens on 127.0.0.1 only.
"""

from absl import app
from absl import flags

from jblock.cluster.membership import MembershipConfig
from jblock.cluster.placement import PlacementError, PlannerConfig
from jblock.cluster.replan import ReplanConfig
from jblock.zoo.cli import quiet_libraries
from launch import cluster_flags
from launch.console import run_script
from launch import engine_flags
from jblock.serving import server

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address the registry listens on (not "
                            "loopback: needs --cluster_token_file or --tls_*).")
_PORT = flags.DEFINE_integer("port", 50051, "Client API port; 0 picks a free one.", lower_bound=0)
_REGISTRY_PORT = flags.DEFINE_integer("registry_port", 50060, "Port workers register on.",
                                      lower_bound=0)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Workers to wait for.", lower_bound=1)
_WORKER_WAIT_S = flags.DEFINE_float("worker_wait_s", 300.0, "How long to wait for the workers.")
_METRICS_PORT = flags.DEFINE_integer("metrics_port", 0, "Prometheus port; 0 = off.", lower_bound=0)
_HEARTBEAT_S = flags.DEFINE_float("heartbeat_interval_s", 0.5, "How often workers send heartbeats.",
                                  lower_bound=0.01)
_DEAD_AFTER_S = flags.DEFINE_float("dead_after_s", 3.0, "Heartbeat silence after which a worker "
                                   "is declared dead.", lower_bound=0.05)
_HOP_COST_S = flags.DEFINE_float("placement_hop_cost_s", PlannerConfig.hop_cost_s,
                                  "Seconds a cross-worker hop adds to a step, for placement.",
                                  lower_bound=0.0)
_BYTES_PER_S = flags.DEFINE_float("placement_bytes_per_s", PlannerConfig.bytes_per_s,
                                  "Weight bytes a worker reads per second (a block's step "
                                  "time), for placement.", lower_bound=1.0)
_MAX_REPLICAS = flags.DEFINE_integer("placement_max_replicas", PlannerConfig.max_replicas,
                                     "Copies a hot shared block may have on different workers "
                                     "(requests balanced over them); 1 = no replicas.",
                                     lower_bound=1)
_WORKER_MEMORY = flags.DEFINE_integer("placement_worker_memory_bytes", 0,
                                      "Memory per worker where its devices report none "
                                      "(0 = unbounded).", lower_bound=0)
_REPLAN_S = flags.DEFINE_float("replan_interval_s", 0.0,
                                "Re-plan placement this often under the measured load (and when "
                                "a worker joins); 0 = keep the first plan.", lower_bound=0.0)
_REPLAN_ON_JOIN = flags.DEFINE_boolean(
    "replan_on_join", True, "Re-plan placement when a worker joins a running cluster (it takes "
    "the blocks the plan gives it).")
_DRAIN_TIMEOUT_S = flags.DEFINE_float("drain_timeout_s", 30.0,
                                      "On SIGTERM, how long in-flight requests may finish.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_libraries()
  if _DEAD_AFTER_S.value <= _HEARTBEAT_S.value:
    raise app.UsageError(f"--dead_after_s ({_DEAD_AFTER_S.value}) must exceed "
                         f"--heartbeat_interval_s ({_HEARTBEAT_S.value})")
  links = cluster_flags.links(engine_flags.zoo_dir())
  host = cluster_flags.bind_host(_HOST.value, links.credentials, "the worker registry")
  try:
    engine, registry = engine_flags.build_distributed_engine(
        _NUM_WORKERS.value, _REGISTRY_PORT.value, host, _WORKER_WAIT_S.value,
        MembershipConfig(_HEARTBEAT_S.value, _DEAD_AFTER_S.value), links=links,
        replan=ReplanConfig(PlannerConfig(hop_cost_s=_HOP_COST_S.value,
                                          bytes_per_s=_BYTES_PER_S.value,
                                          max_replicas=_MAX_REPLICAS.value),
                            worker_memory_bytes=_WORKER_MEMORY.value,
                            interval_s=_REPLAN_S.value, on_join=_REPLAN_ON_JOIN.value))
  except PlacementError as e:  # the models do not fit the workers' memory
    raise app.UsageError(f"{e} (--placement_worker_memory_bytes, --models, --num_workers)")
  try:
    server.serve(engine, _PORT.value, _METRICS_PORT.value, host=host,
                 drain_timeout_s=_DRAIN_TIMEOUT_S.value, tls=links.credentials)
  finally:
    registry.stop(0)


if __name__ == "__main__":
  run_script(main, __name__)
