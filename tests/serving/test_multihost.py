"""A model on a mesh spanning two jax.distributed processes (gloo CPU collectives) gives the
logits and greedy tokens of one process, with each process holding only its share of the
params."""

import json
import os
import pathlib
import shutil
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


@pytest.fixture(scope="module")
def started(zoo_dir, tmp_path_factory):
  """Starts every process of this module at once (they share the cores with the in-process
  reference); kills any left over at the end."""
  tmp = tmp_path_factory.mktemp("runs")
  port = free_port()
  pair = [f"--dist_coordinator=127.0.0.1:{port}", "--num_processes=2", "--local_devices=2",
          "--dist_timeout_s=60", f"--zoo={zoo_dir}", "--model=base", "--mesh_shape=1,4",
          f"--max_new_tokens={NEW_TOKENS}", f"--max_seq_len={MAX_SEQ_LEN}",
          *[f"--prompt={','.join(map(str, p))}" for p in PROMPTS]]
  # A block whose stored config no longer hashes to its id.
  broken = tmp / "broken_zoo"
  shutil.copytree(zoo_dir, broken)
  head_id = Zoo(str(broken)).manifest("base")["chain"][-1]
  record_path = broken / "blocks" / head_id / "block.json"
  record = json.loads(record_path.read_text())
  record["config"]["tampered"] = True  # a field no chain check compares: only the hash tells
  record_path.write_text(json.dumps(record))
  lone = lambda *args: [f"--dist_coordinator=127.0.0.1:{free_port()}", "--model=base",
                        "--prompt=1", *args]
  commands = {
      "process0": pair + ["--process_id=0", f"--output={tmp / 'out.json'}"],
      "process1": pair + ["--process_id=1"],
      "bad_rank": lone("--num_processes=2", "--process_id=2", f"--zoo={zoo_dir}"),
      # Its peer never comes: a bounded wait, then it exits.
      "no_peer": lone("--num_processes=2", "--process_id=0", "--dist_timeout_s=3",
                      f"--zoo={zoo_dir}"),
      "broken": lone("--num_processes=1", "--local_devices=1", f"--zoo={broken}"),
  }
  procs = {name: _launch(args, tmp / f"{name}.log") for name, args in commands.items()}
  try:
    yield procs, tmp, head_id
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def alone(zoo_dir, started):
  """One process, the same (1, 4) mesh layout over its own devices (while the others run)."""
  chain = multihost.MeshChain(Zoo(zoo_dir), "base", mesh_lib.make_mesh((1, 4)),
                              batch_size=len(PROMPTS), max_seq_len=MAX_SEQ_LEN)
  return chain, chain.generate(PROMPTS, NEW_TOKENS)


@pytest.fixture(scope="module")
def runs(started, alone):
  """{name: (return code, log text)} once every process ended (bounded), process 0's result."""
  procs, tmp, head_id = started
  codes = {name: proc.wait(timeout=240) for name, proc in procs.items()}
  out = {name: (codes[name], (tmp / f"{name}.log").read_text()) for name in procs}
  out["head_id"] = head_id
  out["result"] = json.loads((tmp / "out.json").read_text()) if codes["process0"] == 0 else None
  return out


def test_two_process_mesh_matches_one_process(runs, alone, zoo_dir):
  for name in ("process0", "process1"):
    assert runs[name][0] == 0, runs[name][1][-3000:]
  _, one = alone
  assert one.tokens == Zoo(zoo_dir).load_model("base").generate(PROMPTS, NEW_TOKENS).tolist()
  result = runs["result"]
  assert result["mesh"] == {"processes": 2, "devices": 4, "mesh": {"data": 1, "model": 4}}
  assert result["tokens"] == one.tokens
  logits = np.asarray(result["logits"], np.float32)
  assert logits.shape == (NEW_TOKENS, len(PROMPTS), 128)
  np.testing.assert_allclose(logits, one.logits, rtol=0, atol=1e-5)
  assert (logits.argmax(-1).T == np.asarray(result["tokens"])).all()  # greedy: the argmax


def test_each_process_holds_only_its_share_of_the_params(runs, alone):
  # Split on the model axis across both processes: each holds half of every split leaf (plus
  # the small replicated norms), never a whole block.
  chain, _ = alone
  shares = [next(d for d in _lines_of(runs[n][1]) if "local_param_bytes" in d)
            for n in ("process0", "process1")]
  total = shares[0]["global_param_bytes"]
  assert total == sum(i.resident_bytes for i in {i.key: i for i in chain.chain}.values())
  assert shares[0]["local_param_bytes"] == shares[1]["local_param_bytes"] < 0.55 * total
  assert shares[0]["local_param_bytes"] + shares[1]["local_param_bytes"] >= total


def test_bad_rank_is_a_flag_error(runs):
  code, log = runs["bad_rank"]
  assert code == 1
  assert "--process_id must be in [0, 2), got 2" in log and "Traceback" not in log


def test_missing_peer_ends_the_wait(runs):
  code, log = runs["no_peer"]
  assert code != 0  # JAX's coordination client aborts after --dist_timeout_s (3 s here)
  assert "joining the mesh at" in log and "process 0 of 2 (waiting up to 3 s)" in log
  assert "DEADLINE_EXCEEDED" in log and "RegisterTask" in log


def test_corrupted_block_is_refused(runs):
  code, log = runs["broken"]
  assert code == 1
  assert f"corrupted block {runs['head_id']}: its stored kind, config and params hash to" in log
  assert "Traceback" not in log


def _lines_of(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
