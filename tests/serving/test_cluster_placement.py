"""Placement on a running cluster (coordinator in process, two worker processes): the planned
split is what the workers host and what stats explain; hidden states go worker to worker (the
coordinator handles none of their bytes); the two workers compute at the same time; a re-plan
moves blocks and the tokens stay those of the reference."""

import time

import pytest

from jblock.bench.pipeline_bench import TimedExecutors
from jblock.cluster import token_file
from jblock.cluster.links import ClusterLinks
from jblock.cluster.placement import PlannerConfig
from jblock.cluster.replan import ReplanConfig
from jblock.serving.engines import distributed_engine
from tests.serving.serving_helpers import free_port, stop_cluster, wait_until
from tests.serving.test_block_serving import MODELS, NEW, PROMPTS
from tests.serving.test_block_serving import expected, zoo_dir  # noqa: F401 (fixtures)
from tests.serving.test_cluster_faults import CONFIG, _address, _worker

# Hops nearly free: the planner splits every chain to balance compute over both workers.
SPLIT = ReplanConfig(PlannerConfig(hop_cost_s=1e-6, bytes_per_s=1e9), min_gain=0.01)


def _overlap(spans) -> float:
  """Seconds during which RunBlocks on two different workers were both running."""
  best = 0.0
  for i, (w1, s1, e1) in enumerate(spans):
    for w2, s2, e2 in spans[i + 1:]:
      if w1 != w2:
        best = max(best, min(e1, e2) - max(s1, s2))
  return best


@pytest.fixture(scope="module")
def split_cluster(zoo_dir):
  """A coordinator and two worker processes with every chain split over both."""
  registry = free_port()
  procs = [_worker(zoo_dir, registry), _worker(zoo_dir, registry)]
  engine = server = None
  executors = TimedExecutors()  # one thread per worker, each RunBlock timed
  try:
    engine, server = distributed_engine(zoo_dir, MODELS, 2, registry, config=CONFIG, wait_s=120,
                                        progress=lambda *_: None, replan=SPLIT,
                                        executor_factory=executors,
                                        links=ClusterLinks(token_file.zoo_credentials(zoo_dir)))
    yield engine, executors, {_address(p): p for p in procs}
  finally:
    stop_cluster(server, engine, procs)
    executors.close()


def _mailbox_rows(engine) -> dict[str, int]:
  return {w["address"]: w["load"].get("mailbox_rows") for w in engine.stats()["workers"]}


def test_hidden_states_go_worker_to_worker(split_cluster, expected):
  engine, _, procs = split_cluster
  addresses = set(procs)
  live = {b["block_id"]: b["worker"] for b in engine.stats()["blocks"]}
  assert set(live.values()) == addresses  # every chain crosses from one worker to the other
  handles = {(m, i): engine.submit(m, PROMPTS[i], max_new_tokens=NEW)
             for m in MODELS for i in range(len(PROMPTS))}
  cancelled = engine.submit("v1", PROMPTS[5], max_new_tokens=NEW)
  wait_until(lambda: len(cancelled.tokens) >= 2, timeout=120)
  cancelled.cancel()  # its rows waiting in a mailbox are released, not leaked
  assert {k: h.result(timeout=300) for k, h in handles.items()} == expected

  traffic = engine.stats()["hidden_state_traffic"]
  assert set(traffic) == addresses
  for address, t in traffic.items():
    # Only tokens in (embed), step metadata, and sampled tokens out (head) cross the coordinator.
    assert t["hidden_bytes_sent"] == 0 and t["hidden_bytes_received"] == 0, (address, t)
    assert t["rows_sent"] == t["rows_received"] == t["rows_undelivered"] == 0, (address, t)
    assert t["meta_bytes_sent"] > 0 and t["rows_by_reference"] > 0, (address, t)
  embed_worker = next(live[b["block_id"]] for b in engine.stats()["blocks"] if b["kind"] == "embed")
  head_worker = next(live[b["block_id"]] for b in engine.stats()["blocks"] if b["kind"] == "head")
  assert embed_worker != head_worker
  assert traffic[embed_worker]["token_bytes_sent"] > 0
  assert traffic[head_worker]["token_bytes_received"] > 0
  assert traffic[head_worker]["token_bytes_sent"] == 0  # the head's worker takes no tokens in
  # Every step crosses once, worker to worker: each layers row the embed's worker kept or
  # pushed was read by reference on the worker it went to.
  assert traffic[embed_worker]["rows_pushed"] > 0 and traffic[embed_worker]["bytes_pushed"] > 0
  assert traffic[head_worker]["rows_pushed"] == 0
  # Rows read by reference on each worker are at most those kept there or pushed to it (the
  # cancelled request's were released instead).
  assert 0 < traffic[head_worker]["rows_by_reference"] <= (
      traffic[head_worker]["rows_kept"] + traffic[embed_worker]["rows_pushed"])
  # Nothing is left in the mailboxes once the requests are done (the cancelled one included).
  wait_until(lambda: set(_mailbox_rows(engine).values()) == {0}, timeout=10)


def test_planned_split_runs_both_workers_at_once_and_replans_under_load(split_cluster, expected):
  engine, executors, procs = split_cluster
  addresses = set(procs)
  stats = engine.stats()
  plan = stats["placement"]["blocks"]
  live = {b["block_id"]: b["worker"] for b in stats["blocks"]}
  assert {b: p["workers"][0] for b, p in plan.items()} == live  # hosted as planned
  assert set(live.values()) == addresses  # every chain split over both workers
  assert all("traffic" in p["reason"] and " on 127.0.0.1:" in p["reason"] for p in plan.values())
  for model, keys in stats["models"].items():  # contiguous: one crossing per chain step
    workers = [live[k] for k in keys]
    assert sum(a != b for a, b in zip(workers, workers[1:])) == 1, model

  # Every model's streams at once: batches of different requests on both workers overlap.
  handles = {(m, i): engine.submit(m, PROMPTS[i], max_new_tokens=NEW)
             for m in MODELS for i in range(len(PROMPTS))}
  assert {k: h.result(timeout=300) for k, h in handles.items()} == expected
  assert {w for w, _, _ in executors.spans} == addresses
  assert _overlap(executors.spans) > 0.0  # two RPCs on different workers running at the same time

  # Load shifts to one model and hops turn out dear (say, a slower link): the re-plan
  # measures the shift and joins the chains on one worker, moving blocks (new copy, replay,
  # old one freed); requests get the reference tokens, and a second re-plan finds no gain.
  shifted = time.perf_counter()
  hot = [engine.submit("v1", PROMPTS[i], max_new_tokens=NEW) for i in range(len(PROMPTS))]
  assert [h.result(timeout=300) for h in hot] == [expected["v1", i] for i in range(len(PROMPTS))]
  engine.replanner.config = ReplanConfig(PlannerConfig(hop_cost_s=1.0, bytes_per_s=1e9))
  moves = engine.replanner.replan("hops dear", since=shifted)
  entry = engine.stats()["placement"]["replans"][-1]
  assert entry["rates"]["v1"] > 0 and entry["rates"]["base"] == 0 == entry["rates"]["v2"]
  assert moves and entry["cost_after"] < entry["cost_before"], entry
  live = {b["block_id"]: b["worker"] for b in engine.stats()["blocks"]}
  assert all(live[m.block_id] == m.add[0] for m in moves)
  assert len(set(live.values())) == 1
  assert engine.generate("v1", PROMPTS[2], max_new_tokens=NEW) == expected["v1", 2]
  assert engine.generate("base", PROMPTS[3], max_new_tokens=NEW) == expected["base", 3]
  assert engine.replanner.replan("again") == []


def _load(engine, address: str) -> dict:
  return next(w["load"] for w in engine.stats()["workers"] if w["address"] == address)


def test_a_replica_on_the_other_worker_shares_the_load_and_drains_when_dropped(
    split_cluster, expected):
  engine, _, procs = split_cluster
  addresses = set(procs)
  stats = engine.stats()
  shared = next(b for b in stats["blocks"]
                if b["kind"] == "layers" and b["models"] == ["base", "v1", "v2"])
  block, home = shared["block_id"], shared["worker"]
  other = (addresses - {home}).pop()
  before = _load(engine, other)["resident_bytes"]

  engine.replanner.apply({block: [home, other]}, "replicate a hot shared block")
  copies = {c["key"]: c for c in engine.stats()["replicas"][block]}
  assert {k: c["placement"] for k, c in copies.items()} == {block: home, block + "#1": other}
  assert engine.stats()["placement"]["blocks"][block]["copies"] == {block: home,
                                                                    block + "#1": other}
  grown = wait_until(lambda: _load(engine, other)["resident_bytes"] > before and
                     _load(engine, other)["resident_bytes"], timeout=10)
  ran = {k: c["batches_run"] for k, c in copies.items()}

  # Two models' streams at once: bound to both copies, each copy runs batches; tokens unchanged.
  handles = {(m, i): engine.submit(m, PROMPTS[i], max_new_tokens=NEW)
             for m in ("v1", "v2") for i in range(4)}
  assert {k: h.result(timeout=300) for k, h in handles.items()} == {
      k: expected[k] for k in handles}
  copies = {c["key"]: c for c in engine.stats()["replicas"][block]}
  assert all(copies[k]["batches_run"] > ran[k] for k in ran), copies

  # Dropping the replica while requests run through it: they finish there (the drain), then it
  # is unhosted and its worker's bytes go back to what they were.
  handles = {(m, i): engine.submit(m, PROMPTS[i], max_new_tokens=NEW)
             for m in ("v1", "v2") for i in range(2)}
  wait_until(lambda: all(len(h.tokens) >= 1 for h in handles.values()), timeout=120)
  through = {c["key"]: c["requests"] for c in engine.stats()["replicas"][block]}
  assert through[block + "#1"] >= 1, through
  engine.replanner.apply({block: [home]}, "the block cooled down")
  # Drained before the replica went: at least its requests are done by now.
  assert sum(h.done for h in handles.values()) >= through[block + "#1"]
  assert {k: h.result(timeout=1) for k, h in handles.items()} == {k: expected[k] for k in handles}
  assert block not in engine.stats()["replicas"]
  assert block + "#1" not in engine.replanner.placer.plan
  assert engine.stats()["reroute"]["replica_unbound"] == 0  # nothing had to be replayed
  wait_until(lambda: _load(engine, other)["resident_bytes"] == before, timeout=10)
  assert grown - before > 0
  assert engine.generate("v2", PROMPTS[1], max_new_tokens=NEW) == expected["v2", 1]

  # The replica's worker is killed mid-decode: the replica is dropped and its requests replay
  # onto the primary; every request ends with the reference tokens.
  engine.replanner.apply({block: [home, other]}, "replicate again")
  handles = {(m, i): engine.submit(m, PROMPTS[i], max_new_tokens=NEW)
             for m in ("v1", "v2") for i in range(3)}
  wait_until(lambda: all(len(h.tokens) >= 1 for h in handles.values()), timeout=120)
  assert {c["key"]: c["requests"] for c in engine.stats()["replicas"][block]}[block + "#1"] >= 1
  procs[other].kill()
  assert {k: h.result(timeout=120) for k, h in handles.items()} == {k: expected[k] for k in handles}
  wait_until(lambda: block not in engine.stats()["replicas"], timeout=30)
  assert engine.stats()["reroute"]["replica_unbound"] >= 1
