"""The checked-in generated modules match jblock.proto, and --check notices when not."""

import pathlib
import shutil
import subprocess
import sys

from tools import gen_protos

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_generated_modules_are_fresh_and_import_relatively():
  result = subprocess.run([sys.executable, "-m", "tools.gen_protos", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  grpc_module = (REPO / gen_protos.PROTO_DIR / "jblock_pb2_grpc.py").read_text()
  assert "from . import jblock_pb2 as" in grpc_module


def test_check_reports_a_stale_module(tmp_path):
  proto_dir = tmp_path / gen_protos.PROTO_DIR
  shutil.copytree(REPO / gen_protos.PROTO_DIR, proto_dir,
                  ignore=shutil.ignore_patterns("__pycache__"))
  assert gen_protos.stale_files(tmp_path) == []
  proto = proto_dir / "jblock.proto"
  proto.write_text(proto.read_text().replace("message HealthRequest {}",
                                             "message HealthRequest { string probe = 1; }"))
  # A message change touches the messages and their stubs, not the service module.
  assert gen_protos.stale_files(tmp_path) == [f"{gen_protos.PROTO_DIR}/jblock_pb2.py",
                                              f"{gen_protos.PROTO_DIR}/jblock_pb2.pyi"]
  gen_protos.write(tmp_path)
  assert gen_protos.stale_files(tmp_path) == []
