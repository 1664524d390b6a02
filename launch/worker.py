"""A jblock worker: hosts block instances from its zoo and runs them for the coordinator.

  python -m launch.worker --coordinator=127.0.0.1:50060 --zoo=checkpoints/zoo [--port=0]
"""

import signal
import threading
import uuid

from absl import app
from absl import flags

from jblock.zoo.cli import quiet_libraries
from jblock.serving import worker

_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of the coordinator's registry.")
_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Block zoo directory (same blocks as the coordinator's).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on and advertise.")
_PORT = flags.DEFINE_integer("port", 0, "Worker service port; 0 picks a free one.", lower_bound=0)
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", [], "data,model device mesh; empty = all devices.")
flags.mark_flag_as_required("coordinator")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_libraries()
  mesh = tuple(int(v) for v in _MESH_SHAPE.value) if _MESH_SHAPE.value else None
  server, port, _ = worker.start_worker_server(_ZOO.value, _PORT.value, _HOST.value, mesh)
  address = f"{_HOST.value}:{port}"
  stop = threading.Event()
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: stop.set())
  worker.register(_COORDINATOR.value, f"worker-{uuid.uuid4().hex[:8]}", address)
  print(f"jblock: worker serving on {address}", flush=True)
  while not stop.wait(0.2):
    pass
  server.stop(5).wait()


if __name__ == "__main__":
  app.run(main)
