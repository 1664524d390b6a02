"""The real block engine behind gRPC: in process, and with blocks split over two worker processes
that outlive a SIGKILLed coordinator and are adopted, blocks and all, by its restart."""

import concurrent.futures
import os
import re
import select
import subprocess
import sys
import time

import grpc
import pytest
import torch
import transformers

import jblock
from jblock.client import Client
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.runtime.engine import Engine, EngineConfig
from jblock.serving.coordinator import build_server
from jblock.zoo.store import Zoo
from tests import hf_models
from tests.serving.serving_helpers import free_port, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ["base", "v1", "v2"]
PROMPTS = [[(7 * i + j) % 128 for j in range(3 + 4 * i)] for i in range(6)]
NEW = 12
# No warm-up: these tests compile only the shapes their requests reach (warm-up runs in
# tests/runtime/test_engine.py).
CONFIG = EngineConfig(batch_size=4, kv_slots=8, max_seq_len=64, prefill_chunk=16, length_buckets=(16,),
                      warmup=False)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("block_serving")
  cls_name, kwargs = hf_models.ENGINE_BASE
  base = str(root / "hf_base")
  torch.manual_seed(3)
  transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs)).eval() \
      .save_pretrained(base)
  zoo = Zoo(str(root / "zoo"))
  zoo.convert(base, "base")
  for i, d in enumerate(hf_models.partial_variants(base, str(root), n=2, top_layers=2), start=1):
    zoo.convert(d, f"v{i}")
  return str(root / "zoo")


@pytest.fixture(scope="module")
def expected(zoo_dir):
  """Greedy tokens from the reference path (itself checked against transformers elsewhere)."""
  out = {}
  for name in MODELS:
    model = jblock.from_zoo(zoo_dir, name)
    for i, prompt in enumerate(PROMPTS):
      out[name, i] = model.generate([prompt], NEW)[0].tolist()
  return out


def _blocks_loaded(stats: dict) -> dict[str, int]:
  """Worker address -> blocks it has read from its zoo since it started (its heartbeats); None
  until every live worker has sent one."""
  loaded = {w["address"]: w["load"].get("blocks_loaded") for w in stats["workers"]
            if w["state"] == "alive"}
  return loaded if loaded and None not in loaded.values() else None


def _rogue_calls_are_refused(registry: str, stats: dict) -> None:
  """A local process without the cluster token can neither run nor unhost a worker's blocks,
  nor register a fake worker."""
  block = next(b for b in stats["blocks"] if b["kind"] == "layers")
  calls = []
  with grpc.insecure_channel(block["worker"]) as channel:
    host = pb_grpc.BlockHostStub(channel)
    calls.append(lambda: host.RunBlock(pb.RunBlockRequest(block_id=block["block_id"]), timeout=10))
    calls.append(lambda: host.UnhostBlock(pb.UnhostBlockRequest(block_id=block["block_id"]),
                                          timeout=10))
    with grpc.insecure_channel(registry) as registry_channel:
      calls.append(lambda: pb_grpc.RegistryStub(registry_channel).Register(
          pb.RegisterRequest(worker_id="rogue", address="127.0.0.1:1"), timeout=10))
      for call in calls:
        with pytest.raises(grpc.RpcError) as e:
          call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()


def _generate_all(target: str) -> dict:
  def one(job):
    name, i = job
    with Client(target) as client:
      return job, client.generate_tokens(name, prompt_tokens=PROMPTS[i], max_tokens=NEW, timeout=300)
  jobs = [(name, i) for name in MODELS for i in range(len(PROMPTS))]
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    return dict(pool.map(one, jobs))


def test_concurrent_clients_of_three_models_get_the_engines_tokens(zoo_dir, expected):
  engine = Engine.from_zoo(zoo_dir, MODELS, mesh_shape=(1, 1), config=CONFIG)
  server, port = build_server(engine, 0)
  server.start()
  try:
    assert _generate_all(f"127.0.0.1:{port}") == expected
    with Client(f"127.0.0.1:{port}") as client:
      sampled = client.generate_tokens("v1", prompt_tokens=PROMPTS[2], max_tokens=NEW,
                                       temperature=0.8, top_k=30, seed=7, timeout=60)
      stats = client.stats()
    assert sampled == engine.submit("v1", PROMPTS[2], max_new_tokens=NEW, temperature=0.8, top_k=30,
                                    seed=7).result(60)
    assert any(len(t["models"]) > 1 for t in engine.trace())
    assert all(b["kv_slots_used"] == 0 for b in stats["blocks"])
  finally:
    server.stop(0)
    engine.close()


def _start(args: list[str]) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_line(proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
  deadline = time.monotonic() + timeout
  seen = []
  while time.monotonic() < deadline:
    if select.select([proc.stdout], [], [], 0.1)[0]:
      line = proc.stdout.readline()
      seen.append(line)
      match = re.search(pattern, line)
      if match:
        return match
    if proc.poll() is not None:
      raise AssertionError(f"process exited early:\n{''.join(seen)}{proc.stdout.read()}")
  raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{''.join(seen[-20:])}")


def test_two_worker_processes_give_the_same_tokens_and_outlive_their_coordinator(zoo_dir,
                                                                                  expected):
  registry, port = free_port(), free_port()
  common = [f"--zoo={zoo_dir}", "--mesh_shape=1,1"]
  coordinator = ["launch.coordinator", *common[:1], "--num_workers=2",
                 f"--registry_port={registry}", f"--port={port}", "--batch_size=4",
                 "--kv_slots=8", "--max_seq_len=64", "--prefill_chunk=16",
                 "--compilation_cache_dir=", "--worker_wait_s=120",
                 # Hops free: the planner splits every chain to balance the two workers.
                 "--placement_hop_cost_s=0"]
  procs = [_start(coordinator)]
  try:
    for _ in range(2):
      procs.append(_start(["launch.worker", f"--coordinator=127.0.0.1:{registry}", *common]))
    _wait_line(procs[0], r"serving on 127\.0\.0\.1:(\d+)", timeout=300)
    assert _generate_all(f"127.0.0.1:{port}") == expected
    with Client(f"127.0.0.1:{port}") as client:
      stats = client.stats()
    workers = {b["placement"].split(":")[0] + ":" + b["placement"].split(":")[1] for b in stats["blocks"]}
    assert len(workers) == 2 and all(p.startswith("worker 127.0.0.1") for p in workers)
    placed = stats["placement"]["blocks"]  # where every block lives and why (tools.client stats)
    assert set(placed) == {b["block_id"] for b in stats["blocks"]}
    assert all(p["workers"] and p["reason"].startswith("traffic") for p in placed.values())
    # With no credential flags the cluster has a token only this user can read (the zoo's
    # cluster.token, made by the coordinator, read by the workers).
    assert os.stat(os.path.join(zoo_dir, "cluster.token")).st_mode & 0o777 == 0o600
    _rogue_calls_are_refused(f"127.0.0.1:{registry}", stats)
    # Logprobs, penalties and bias reach the head on its worker as checked head inputs.
    with Client(f"127.0.0.1:{port}") as client:
      chunks = list(client.generate("v1", prompt_tokens=PROMPTS[1], max_tokens=NEW, logprobs=2,
                                    prompt_logprobs=1, timeout=300))
      forced = client.generate_tokens("v2", prompt_tokens=PROMPTS[1], max_tokens=NEW,
                                      logit_bias={11: 100}, repetition_penalty=1.2, timeout=300)
    steps = [e for c in chunks for e in c.logprobs]
    assert [e[0] for e in steps] == [e[2][0][0] for e in steps] == expected["v1", 1]
    assert all(e[1] < 0 and e[2][0][1] == e[1] >= e[2][1][1] for e in steps)
    assert len(chunks[0].prompt_logprobs) == len(PROMPTS[1]) and forced == [11] * NEW

    # The coordinator is SIGKILLed mid-stream: that stream fails UNAVAILABLE; the workers keep
    # their blocks, and the coordinator restarted with the same flags adopts them (nothing is
    # loaded again) and serves; a client waiting meanwhile gets its tokens.
    with Client(f"127.0.0.1:{port}") as client:
      loaded = wait_until(lambda: _blocks_loaded(client.stats()), timeout=30)
      stream = client.generate("v1", prompt_tokens=PROMPTS[5], max_tokens=40, timeout=300)
      next(stream)
      procs[0].kill()
      procs[0].wait(timeout=30)
      with pytest.raises(grpc.RpcError) as e:
        list(stream)
      assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    procs[0].stdout.close()
    procs[0] = _start(coordinator)
    with Client(f"127.0.0.1:{port}", retry_s=120) as client:
      assert client.generate_tokens("v2", prompt_tokens=PROMPTS[3], max_tokens=NEW,
                                    timeout=300) == expected["v2", 3]
      assert wait_until(lambda: _blocks_loaded(client.stats()), timeout=30) == loaded
    assert _generate_all(f"127.0.0.1:{port}") == expected
    procs[0].terminate()
    assert procs[0].wait(timeout=60) == 0
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
        try:
          p.wait(timeout=15)
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait(timeout=10)
      p.stdout.close()


def test_unload_frees_unshared_blocks_and_load_brings_them_back(zoo_dir, expected):
  engine = Engine.from_zoo(zoo_dir, MODELS, mesh_shape=(1, 1), config=CONFIG)
  server, port = build_server(engine, 0)
  server.start()
  try:
    with Client(f"127.0.0.1:{port}") as client:
      before = {b["block_id"]: b for b in client.stats()["blocks"]}
      running = client.generate("v2", prompt_tokens=PROMPTS[3], max_tokens=NEW, timeout=120)
      first = next(running)
      client.unload_model("v2")  # drains: the running request still completes
      tokens = list(first.token_ids) + [t for chunk in running for t in chunk.token_ids]
      assert tokens == expected["v2", 3]
      assert [m.name for m in client.list_models()] == ["base", "v1"]
      after = {b["block_id"]: b for b in client.stats()["blocks"]}
      only_v2 = {i for i, b in before.items() if b["models"] == ["v2"]}
      assert len(only_v2) == 2 and set(after) == set(before) - only_v2
      client.load_model("v2")
      assert client.generate_tokens("v2", prompt_tokens=PROMPTS[1], max_tokens=NEW) == expected["v2", 1]
      assert len(client.stats()["blocks"]) == len(before)
  finally:
    server.stop(0)
    engine.close()
