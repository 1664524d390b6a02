"""A coordinator (in process) with worker processes: late join, a block moved between workers
mid-request, unload frees worker memory, a worker SIGKILLed mid-decode (every stream ends with its undisturbed tokens), no worker left
(UNAVAILABLE naming why), a worker joining brings the lost blocks back, and workers exit by
themselves once the coordinator is gone; a worker joining a running cluster takes blocks (the
placement is re-planned on the join: launch.coordinator's default)."""

import signal
import subprocess
import sys
import time

import pytest
from absl import flags

from jblock.cluster import token_file
from jblock.cluster.links import ClusterLinks
from jblock.cluster.membership import MembershipConfig
from jblock.cluster.placement import PlannerConfig
from jblock.cluster.replan import ReplanConfig
from jblock.errors import UnavailableError
from jblock.runtime.engine import EngineConfig
from jblock.serving.engines import distributed_engine
from tests.serving.serving_helpers import InProcessWorkers, free_port, stop_cluster, wait_until
from tests.serving.test_block_serving import MODELS, NEW, PROMPTS, REPO, _wait_line
from tests.serving.test_block_serving import expected, zoo_dir  # noqa: F401 (fixtures)

CONFIG = EngineConfig(batch_size=4, kv_slots=8, max_seq_len=64, prefill_chunk=16,
                      length_buckets=(16,), warmup=False)
ORPHANED = 3  # launch.worker's exit status once its coordinator is gone


def _worker(zoo: str, registry: int) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "launch.worker", f"--coordinator=127.0.0.1:{registry}",
       f"--zoo={zoo}", "--mesh_shape=1,1", "--coordinator_timeout_s=2"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _worker_view(engine, address: str) -> dict:
  return next(w for w in engine.stats()["workers"] if w["address"] == address)


def _address(proc) -> str:
  return _wait_line(proc, r"serving on (127\.0\.0\.1:\d+)", timeout=120).group(1)


def _blocks_on(engine, address: str) -> set[str]:
  return {b["block_id"] for b in engine.stats()["blocks"] if b["worker"] == address}


def test_workers_join_fail_over_and_outlive_no_coordinator(zoo_dir, expected):
  registry = free_port()
  procs = [_worker(zoo_dir, registry)]
  engine, server = None, None
  try:
    engine, server = distributed_engine(zoo_dir, ["base", "v1"], 1, registry, config=CONFIG,
                                        wait_s=120, progress=lambda *_: None,
                                        membership=MembershipConfig(0.2, 2.0),
                                        links=ClusterLinks(token_file.zoo_credentials(zoo_dir)))
    first = _address(procs[0])

    # A late joiner gets the blocks of the model loaded next (it hosts the fewest).
    procs.append(_worker(zoo_dir, registry))
    second = _address(procs[1])
    wait_until(lambda: len(engine.stats()["workers"]) == 2, timeout=30)
    engine.load_model("v2")
    only_v2 = {b["block_id"] for b in engine.stats()["blocks"] if b["models"] == ["v2"]}
    assert len(only_v2) == 2 and _blocks_on(engine, second) == only_v2
    assert engine.generate("v2", PROMPTS[1], max_new_tokens=NEW) == expected["v2", 1]

    # Moving a block while a request runs through it: a new copy on the other worker, the old
    # one freed there, the request replays its KV into the copy.
    moved = next(b for b in engine.stats()["blocks"]
                 if b["block_id"] in only_v2 and b["kind"] == "layers")
    wait_until(lambda: _worker_view(engine, second)["load"].get("blocks_hosted") == 2, timeout=10)
    running = engine.submit("v2", PROMPTS[4], max_new_tokens=NEW)
    wait_until(lambda: len(running.tokens) >= 2, timeout=60)
    engine.relocate([moved["key"]], "moved to balance", to=first).join(60)
    assert _blocks_on(engine, second) == only_v2 - {moved["block_id"]}
    assert running.result(timeout=60) == expected["v2", 4]
    wait_until(lambda: _worker_view(engine, second)["load"]["blocks_hosted"] == 1, timeout=10)

    # SIGKILL the worker of the shared blocks while every stream is mid-decode.
    handles = {(m, i): engine.submit(m, PROMPTS[i], max_new_tokens=NEW)
               for m in MODELS for i in range(len(PROMPTS))}
    wait_until(lambda: any(len(h.tokens) >= 2 for h in handles.values()), timeout=120)
    procs[0].send_signal(signal.SIGKILL)
    at_kill = {k: len(h.tokens) for k, h in handles.items()}
    assert any(0 < n < NEW for n in at_kill.values())
    got = {k: h.result(timeout=120) for k, h in handles.items()}
    assert got == expected
    assert _worker_view(engine, first)["state"] == "dead"
    stats = engine.stats()
    assert {b["worker"] for b in stats["blocks"]} == {second}
    assert all(b["moves"] and b["moves"][0].startswith(first) for b in stats["blocks"]
               if b["block_id"] not in only_v2)
    assert all(b["kv_slots_used"] == 0 for b in stats["blocks"])

    # Unload frees the survivor's memory (its heartbeats report what it holds).
    hosted = lambda n: (lambda load: load if load.get("blocks_hosted") == n else None)(
        _worker_view(engine, second)["load"])
    total = len(stats["blocks"])
    before = wait_until(lambda: hosted(total), timeout=10)
    engine.unload_model("v2")
    after = wait_until(lambda: hosted(total - len(only_v2)), timeout=10)
    assert after["resident_bytes"] < before["resident_bytes"]
    assert after["kv_bytes"] < before["kv_bytes"]

    # No worker left: running requests fail UNAVAILABLE, saying why.
    running = engine.submit("base", PROMPTS[5], max_new_tokens=NEW)
    wait_until(lambda: running.tokens, timeout=60)
    procs[1].send_signal(signal.SIGKILL)
    with pytest.raises(UnavailableError, match="could not be placed on any worker: no live worker"):
      running.result(timeout=60)
    with pytest.raises(UnavailableError, match="cannot run"):
      engine.submit("base", PROMPTS[0], max_new_tokens=NEW)

    # A worker joining takes the lost blocks; serving goes on.
    procs.append(_worker(zoo_dir, registry))
    third = _address(procs[2])
    wait_until(lambda: _blocks_on(engine, third) and all(
        b["available"] for b in engine.stats()["blocks"]), timeout=60)
    assert engine.generate("v1", PROMPTS[2], max_new_tokens=NEW) == expected["v1", 2]

    # The coordinator goes away: the worker notices and exits by itself.
    server.stop(0)
    gone = time.monotonic()
    assert procs[2].wait(timeout=15) == ORPHANED
    assert time.monotonic() - gone < 10
    assert "no answer from the coordinator" in procs[2].stdout.read()
  finally:
    stop_cluster(server, engine, procs)


# Hops nearly free: a second worker always halves the busiest one's compute, so the plan pays.
ON_JOIN = ReplanConfig(PlannerConfig(hop_cost_s=1e-6, bytes_per_s=1e9), min_gain=0.01,
                       on_join=True)


def test_launch_coordinator_replans_on_join_by_default():
  import launch.coordinator  # noqa: F401 (defines the flag)
  assert flags.FLAGS["replan_on_join"].default is True


def test_a_joining_worker_gets_blocks_and_chains_keep_their_tokens(zoo_dir, expected):
  registry = free_port()
  workers = InProcessWorkers(zoo_dir, f"127.0.0.1:{registry}")
  engine = registry_server = None
  try:
    first = workers.join()
    engine, registry_server = distributed_engine(
        zoo_dir, ["base", "v1"], 1, registry, config=CONFIG, wait_s=60,
        progress=lambda *_: None, replan=ON_JOIN)
    assert {b["worker"] for b in engine.stats()["blocks"]} == {first}
    assert engine.generate("v1", PROMPTS[2], max_new_tokens=NEW) == expected["v1", 2]

    second = workers.join()
    replan = wait_until(lambda: next((h for h in engine.stats()["placement"]["replans"]
                                      if h["reason"] == f"worker {second} joined"), None),
                        timeout=60)
    assert replan["moves"] and "failed" not in replan
    assert second in {b["worker"] for b in engine.stats()["blocks"]}
    handles = {(m, i): engine.submit(m, PROMPTS[i], max_new_tokens=NEW)
               for m in ("base", "v1") for i in range(3)}
    assert {k: h.result(timeout=120) for k, h in handles.items()} == {
        k: expected[k] for k in handles}
  finally:
    if engine is not None:
      engine.close()
    workers.close()
    if registry_server is not None:
      registry_server.stop(0)
