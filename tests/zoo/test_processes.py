"""Across processes: the same ids everywhere, and conversions racing into one zoo."""

import json
import os
import subprocess
import sys

from jblock.convert import hf
from jblock.zoo import Zoo
from tests.zoo.conftest import NUM_LAYERS, TRAINED_TOP

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
  # One CPU device and no accelerator probing: these processes only convert and hash.
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}


def test_block_ids_equal_across_processes(base_dir):
  code = ("import json, sys; from jblock.convert import hf; "
          "print(json.dumps([b.id for b in hf.convert(sys.argv[1]).blocks]))")
  out = subprocess.run([sys.executable, "-c", code, base_dir], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120, check=True)
  theirs = json.loads(out.stdout.strip().splitlines()[-1])
  assert theirs == [b.id for b in hf.convert(base_dir).blocks]


def test_concurrent_conversions_both_succeed(tmp_path, base_dir, variant_dirs):
  zoo_dir = str(tmp_path / "zoo")
  jobs = [(base_dir, "base"), (variant_dirs[0], "ft-1")]
  procs = [subprocess.Popen([sys.executable, "-m", "tools.convert", f"--hf_dir={d}",
                             f"--name={name}", f"--zoo={zoo_dir}"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for d, name in jobs]
  results = [p.communicate(timeout=180) + (p.returncode,) for p in procs]
  for out, err, code in results:
    assert code == 0, err
    assert "blocks written" in out and "Traceback" not in err

  zoo = Zoo(zoo_dir)
  assert zoo.verify() == []
  assert zoo.models() == ["base", "ft-1"]
  # Ids computed in other processes equal ours, and every shared block is stored once.
  for d, name in jobs:
    assert zoo.manifest(name)["chain"] == [b.id for b in hf.convert(d).blocks]
  assert len(zoo.block_ids()) == NUM_LAYERS + 2 + TRAINED_TOP
  assert os.listdir(zoo.tmp_dir) == []  # the loser of each rename race cleaned up
  # Both may try to write a shared block; exactly one rename wins, the other counts it reused.
  written = sum(int(out.split("blocks written:")[1].split()[0]) for out, _, _ in results)
  assert written == len(zoo.block_ids())
