"""A model on a mesh spanning two jax.distributed processes (gloo CPU collectives) gives the
logits and greedy tokens of one process, with each process holding only its share of the
params."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from jblock.cluster import multihost
from jblock.runtime import mesh as mesh_lib
from jblock.zoo.store import Zoo
from tests import hf_models
from tests.serving.serving_helpers import free_port

REPO = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
NEW_TOKENS = 6
MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp("multihost")
  cls_name, kwargs = hf_models.ENGINE_BASE  # widths divisible by 4: every projection splits
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      getattr(transformers, cls_name)(**kwargs)).eval()
  model.save_pretrained(str(root / "hf"))
  Zoo(str(root / "zoo")).convert(str(root / "hf"), "base")
  return str(root / "zoo")


def _launch(args: list[str], log: pathlib.Path) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # --local_devices decides
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, "-m", "launch.multihost", *args], cwd=REPO,
                            stdout=f, stderr=subprocess.STDOUT, env=env, text=True)


@pytest.fixture
def processes(request):
  started: list[subprocess.Popen] = []

  def kill_all():
    for proc in started:
      if proc.poll() is None:
        proc.kill()
        proc.wait(10)

  request.addfinalizer(kill_all)
  return started


def _lines(log: pathlib.Path) -> list[dict]:
  out = []
  for line in log.read_text().splitlines():
    if line.startswith("{"):
      out.append(json.loads(line))
  return out


def test_two_process_mesh_matches_one_process(zoo_dir, tmp_path, processes):
  port = free_port()
  common = [f"--dist_coordinator=127.0.0.1:{port}", "--num_processes=2", "--local_devices=2",
            "--dist_timeout_s=60", f"--zoo={zoo_dir}", "--model=base", "--mesh_shape=1,4",
            f"--max_new_tokens={NEW_TOKENS}", f"--max_seq_len={MAX_SEQ_LEN}",
            *[f"--prompt={','.join(map(str, p))}" for p in PROMPTS]]
  out_file = tmp_path / "out.json"
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  processes.append(_launch(common + ["--process_id=0", f"--output={out_file}"], logs[0]))
  processes.append(_launch(common + ["--process_id=1"], logs[1]))
  bad_log = tmp_path / "bad.log"
  processes.append(_launch([f"--dist_coordinator=127.0.0.1:{free_port()}", "--num_processes=2",
                            "--process_id=2", f"--zoo={zoo_dir}", "--model=base", "--prompt=1"],
                           bad_log))

  lone_log = tmp_path / "lone.log"  # its peer never comes: bounded wait, then it exits
  processes.append(_launch([f"--dist_coordinator=127.0.0.1:{free_port()}", "--num_processes=2",
                            "--process_id=0", "--dist_timeout_s=3", f"--zoo={zoo_dir}",
                            "--model=base", "--prompt=1"], lone_log))

  # One process, same (1, 4) mesh layout over its own devices, while the pair runs.
  zoo = Zoo(zoo_dir)
  local = multihost.MeshChain(zoo, "base", mesh_lib.make_mesh((1, 4)), batch_size=len(PROMPTS),
                              max_seq_len=MAX_SEQ_LEN)
  alone = local.generate(PROMPTS, NEW_TOKENS)
  reference = zoo.load_model("base")  # the reference chain, one device
  assert alone.tokens == reference.generate(PROMPTS, NEW_TOKENS).tolist()

  for proc, log in zip(processes[:2], logs):
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
  assert processes[2].wait(timeout=60) != 0
  bad = bad_log.read_text()
  assert "--process_id must be in [0, 2), got 2" in bad and "Traceback" not in bad
  assert processes[3].wait(timeout=60) != 0  # 3 s to join (plus start-up), not forever
  lone = lone_log.read_text()
  assert "joining the mesh at" in lone and "process 0 of 2 (waiting up to 3 s)" in lone
  assert "DEADLINE_EXCEEDED" in lone and "RegisterTask" in lone

  result = json.loads(out_file.read_text())
  assert result["mesh"] == {"processes": 2, "devices": 4, "mesh": {"data": 1, "model": 4}}
  assert result["tokens"] == alone.tokens
  logits = np.asarray(result["logits"], np.float32)
  assert logits.shape == (NEW_TOKENS, len(PROMPTS), 128)
  np.testing.assert_allclose(logits, alone.logits, rtol=0, atol=1e-5)
  # Greedy: every token is its logits' argmax.
  assert (logits.argmax(-1).T == np.asarray(result["tokens"])).all()

  # Params split on the model axis across both processes: each holds its own half of the
  # split leaves (plus the small replicated norms), never the whole block.
  shares = [next(d for d in _lines(log) if "local_param_bytes" in d) for log in logs]
  total = shares[0]["global_param_bytes"]
  assert total == sum(i.resident_bytes for i in {i.key: i for i in local.chain}.values())
  assert shares[0]["local_param_bytes"] == shares[1]["local_param_bytes"] < 0.55 * total
  assert shares[0]["local_param_bytes"] + shares[1]["local_param_bytes"] >= total

