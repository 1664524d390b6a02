"""Regenerates jblock's gRPC Python modules from jblock/proto/jblock.proto.

  python -m tools.gen_protos           # rewrite the generated files
  python -m tools.gen_protos --check   # exit 1 and name the files that are stale
"""

import os
import pathlib
import sys
import tempfile

from absl import app
from absl import flags

_CHECK = flags.DEFINE_bool("check", False,
                          "Only report generated files that differ from the .proto.")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = "jblock/proto"
PROTO = f"{PROTO_DIR}/jblock.proto"
GENERATED = ("jblock_pb2.py", "jblock_pb2.pyi", "jblock_pb2_grpc.py")
# protoc writes an absolute import; the package must import its own module relatively.
ABSOLUTE_IMPORT = "from jblock.proto import jblock_pb2 as"
RELATIVE_IMPORT = "from . import jblock_pb2 as"


def generate(root: pathlib.Path = REPO_ROOT) -> dict[str, str]:
  """Runs protoc on the .proto under `root`; returns {file name: fixed contents}."""
  from grpc_tools import protoc
  import grpc_tools
  well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
  with tempfile.TemporaryDirectory() as out:
    args = ["grpc_tools.protoc", f"-I{root}", f"-I{well_known}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", str(root / PROTO)]
    if protoc.main(args) != 0:
      raise RuntimeError(f"protoc failed on {root / PROTO}")
    files = {}
    for name in GENERATED:
      text = (pathlib.Path(out) / PROTO_DIR / name).read_text()
      files[name] = text.replace(ABSOLUTE_IMPORT, RELATIVE_IMPORT)
  return files


def stale_files(root: pathlib.Path = REPO_ROOT) -> list[str]:
  """Generated files under `root` that are missing or differ from a fresh generation."""
  stale = []
  for name, text in generate(root).items():
    path = root / PROTO_DIR / name
    if not path.exists() or path.read_text() != text:
      stale.append(f"{PROTO_DIR}/{name}")
  return stale


def write(root: pathlib.Path = REPO_ROOT) -> list[str]:
  written = []
  for name, text in generate(root).items():
    (root / PROTO_DIR / name).write_text(text)
    written.append(f"{PROTO_DIR}/{name}")
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CHECK.value:
    stale = stale_files()
    if stale:
      print(f"stale generated protos (run python -m tools.gen_protos): {', '.join(stale)}",
            file=sys.stderr)
      sys.exit(1)
    print("generated protos are up to date")
    return
  for path in write():
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
