"""tools.convert and tools.zoo: reports on stdout, one-line errors with a non-zero exit code."""

import os
import subprocess
import sys

from tests.zoo.conftest import NUM_LAYERS, NUM_VARIANTS, TRAINED_TOP

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)


def _one_line_error(result, *needles):
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  for needle in needles:
    assert needle in lines[0]


def test_convert_without_hf_dir():
  _one_line_error(_run("tools.convert", "--name=x"), "convert: error:", "--hf_dir")


def test_convert_with_a_bad_dtype(base_dir):
  _one_line_error(_run("tools.convert", f"--hf_dir={base_dir}", "--name=x", "--dtype=float16"),
                  "--dtype", "float32", "bfloat16")


def test_zoo_stats_and_verify(zoo_copy, zoo_reports):
  stats = _run("tools.zoo", "stats", f"--zoo={zoo_copy.root}")
  assert stats.returncode == 0, stats.stderr
  expected = zoo_reports[0].stats()
  assert f"{expected.stored_blocks} stored" in stats.stdout
  assert expected.stored_blocks == NUM_LAYERS + 2 + NUM_VARIANTS * TRAINED_TOP
  assert f"({expected.logical_bytes} B" in stats.stdout
  assert f"({expected.stored_bytes} B" in stats.stdout
  assert f"dedup ratio:   {expected.dedup_ratio:.2f}x" in stats.stdout

  # A damaged block: verify names it and fails.
  damaged = zoo_reports[1][1].written[0]
  with open(os.path.join(zoo_copy.blocks_dir, damaged, "block.json"), "w") as f:
    f.write("{}")
  verify = _run("tools.zoo", "verify", f"--zoo={zoo_copy.root}")
  assert verify.returncode == 1
  assert f"problem: corrupted block {damaged}" in verify.stdout and "1 problem" in verify.stdout
