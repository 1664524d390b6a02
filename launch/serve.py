"""All-in-one jblock server: the coordinator's gRPC API over an in-process block engine.

  python -m launch.serve --demo                         # builds checkpoints/zoo on first run
  python -m launch.serve --zoo=DIR --models=a,b --port=50051 --metrics_port=9090
  python -m launch.serve --engine=mock                  # fake tokens, no model (tests)

SIGTERM or SIGINT: stop accepting requests, finish the in-flight ones, exit 0.
"""

from absl import app
from absl import flags

from jblock.zoo.cli import quiet_libraries
from launch import engine_flags
from jblock.serving import server

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: all).")
_PORT = flags.DEFINE_integer("port", 50051, "gRPC port; 0 picks a free one.", lower_bound=0)
_METRICS_PORT = flags.DEFINE_integer("metrics_port", 0, "Prometheus port; 0 = off.", lower_bound=0)
_MAX_WORKERS = flags.DEFINE_integer("max_workers", 64, "Concurrent RPCs served.", lower_bound=1)
_DRAIN_TIMEOUT_S = flags.DEFINE_float("drain_timeout_s", 30.0,
                                      "On SIGTERM, how long in-flight requests may finish.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_libraries()
  engine = engine_flags.build_engine()
  server.serve(engine, _PORT.value, _METRICS_PORT.value, host=_HOST.value,
               max_workers=_MAX_WORKERS.value, drain_timeout_s=_DRAIN_TIMEOUT_S.value)


if __name__ == "__main__":
  app.run(main)
