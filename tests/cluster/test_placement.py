"""The placement planner: hops vs compute under memory, replication of hot shared blocks, diffs."""

import pytest

from jblock.cluster.placement import (PlacementError, PlacementInputs, PlannerConfig, diff,
                                      evaluate, plan)

MB = 1 << 20
CHAIN = ["embed", "l0", "l1", "l2", "l3", "head"]
SIZES = {"embed": 4 * MB, "l0": 8 * MB, "l1": 8 * MB, "l2": 8 * MB, "l3": 8 * MB, "head": 4 * MB}


def _inputs(chains, memory, rates=None, sizes=SIZES):
  return PlacementInputs(chains, sizes, memory, rates or {})


def test_expensive_hops_keep_a_chain_on_one_worker():
  p = plan(_inputs({"m": CHAIN}, {"w1": 0, "w2": 0}), PlannerConfig(hop_cost_s=1.0))
  assert len({ws[0] for ws in p.hosts.values()}) == 1
  assert p.hops_per_s == 0.0


def test_cheap_hops_split_a_chain_into_two_balanced_contiguous_segments():
  p = plan(_inputs({"m": CHAIN}, {"w1": 0, "w2": 0}),
           PlannerConfig(hop_cost_s=1e-6, bytes_per_s=1e9))
  workers = [p.routes["m"][b] for b in CHAIN]
  assert len(set(workers)) == 2
  assert sum(a != b for a, b in zip(workers, workers[1:])) == 1  # one crossing: contiguous
  assert p.hops_per_s == 1.0
  load = sorted(p.worker_load_s.values())
  assert load[0] == pytest.approx(20 * MB / 1e9)  # 40 MB split exactly in half
  assert load[1] == pytest.approx(20 * MB / 1e9)
  assert "splits its chain here" in p.reasons[CHAIN[0]] or "splits its chain here" in p.reasons["l2"]


def test_memory_forces_a_split_and_a_block_too_big_is_named():
  # 40 MB of blocks, 30 MB per worker (x0.9 headroom = 27 MB): cannot sit on one worker.
  p = plan(_inputs({"m": CHAIN}, {"w1": 30 * MB, "w2": 30 * MB}), PlannerConfig(hop_cost_s=1.0))
  per_worker = {}
  for b, ws in p.hosts.items():
    per_worker[ws[0]] = per_worker.get(ws[0], 0) + SIZES[b]
  assert len(per_worker) == 2 and max(per_worker.values()) <= 27 * MB
  assert p.hops_per_s == 1.0  # the fewest crossings memory allows
  with pytest.raises(PlacementError, match="block l0 .*fits on no worker"):
    plan(_inputs({"m": CHAIN}, {"w1": 6 * MB, "w2": 6 * MB}))


def test_errors_name_the_input():
  with pytest.raises(PlacementError, match="worker_memory"):
    plan(_inputs({"m": CHAIN}, {}))
  with pytest.raises(PlacementError, match="block_bytes: block nope"):
    plan(_inputs({"m": ["nope"]}, {"w1": 0}))
  with pytest.raises(PlacementError, match="rates: chain m"):
    plan(_inputs({"m": CHAIN}, {"w1": 0}, {"m": -1.0}))


# Two variants share their bottom (embed, l0, l1); each has its own top. Memory allows one top
# per worker, so the variants' tops land apart and one variant crosses to the shared bottom.
SHARED = {"a": ["embed", "l0", "l1", "a2", "a3", "ahead"],
          "b": ["embed", "l0", "l1", "b2", "b3", "bhead"]}
SHARED_SIZES = {"embed": 2 * MB, "l0": 2 * MB, "l1": 2 * MB, "a2": 8 * MB, "a3": 8 * MB,
                "ahead": 4 * MB, "b2": 8 * MB, "b3": 8 * MB, "bhead": 4 * MB}
SHARED_MEM = {"w1": 36 * MB, "w2": 36 * MB}  # 32.4 MB usable: bottom + one top, not two tops


def test_a_hot_shared_bottom_is_replicated_next_to_each_variant():
  inputs = _inputs(SHARED, SHARED_MEM, {"a": 5.0, "b": 5.0}, SHARED_SIZES)
  single = plan(inputs, PlannerConfig(hop_cost_s=0.01))
  assert single.hops_per_s == 5.0  # one variant crosses once to the shared bottom
  twice = plan(inputs, PlannerConfig(hop_cost_s=0.01, max_replicas=2))
  assert twice.hops_per_s == 0.0
  assert sorted(twice.hosts["l1"]) == ["w1", "w2"]
  for chain in SHARED:  # each variant uses the copy on its own top's worker: a request sticks to it
    assert len(set(twice.routes[chain].values())) == 1
  assert twice.routes["a"]["l1"] != twice.routes["b"]["l1"]
  assert "replicated" in twice.reasons["l1"]
  assert twice.cost < single.cost
  # A plan in force is costed with its copies: each chain takes the copy next to its neighbour.
  assert evaluate(inputs, twice.hosts, PlannerConfig(hop_cost_s=0.01)) == pytest.approx(twice.cost)
  assert evaluate(inputs, single.hosts, PlannerConfig(hop_cost_s=0.01)) == pytest.approx(single.cost)


def test_a_cold_shared_block_is_not_replicated():
  inputs = _inputs(SHARED, SHARED_MEM, {"a": 5.0, "b": 5.0}, SHARED_SIZES)
  p = plan(inputs, PlannerConfig(hop_cost_s=0.01, max_replicas=2, replicate_min_share=1.5))
  assert all(len(ws) == 1 for ws in p.hosts.values())


def test_diff_hosts_new_copies_before_unhosting_and_follows_workers_leaving():
  inputs = _inputs(SHARED, SHARED_MEM, {"a": 5.0, "b": 5.0}, SHARED_SIZES)
  config = PlannerConfig(hop_cost_s=0.01)
  before = plan(inputs, config)
  assert diff(before, plan(inputs, config, previous=before)) == []  # nothing to move
  after = plan(inputs, PlannerConfig(hop_cost_s=0.01, max_replicas=2), previous=before)
  moves = diff(before, after)
  assert {m.block_id for m in moves} == {"embed", "l0", "l1"}
  assert all(len(m.add) == 1 and not m.remove for m in moves)  # replicas: add only
  # w2 leaves: everything it held moves to w1 (memory unbounded there now).
  gone = plan(PlacementInputs(SHARED, SHARED_SIZES, {"w1": 0}, {"a": 5.0, "b": 5.0}), config,
              previous=before)
  moves = diff(before, gone)
  assert moves and all(m.add == ("w1",) and m.remove == ("w2",) for m in moves)
  assert {m.block_id for m in moves} == {b for b, ws in before.hosts.items() if ws == ["w2"]}


def test_rates_and_memory_from_the_engine_and_heartbeats():
  from jblock.cluster.replan import measured_rates, worker_memory
  trace = [  # two seconds: "a"'s last block ran 6 items alone and 4 shared evenly with "b"
      {"blocks": ("ahead",), "items": 6, "models": ("a",), "dispatched": 0.0, "done": 1.0},
      {"blocks": ("shared_head",), "items": 4, "models": ("a", "b"), "dispatched": 1.0,
       "done": 2.0},
      {"blocks": ("l0",), "items": 9, "models": ("a", "b"), "dispatched": 1.0, "done": 2.0}]
  rates = measured_rates(trace, {"a": "ahead", "b": "shared_head", "c": "chead"})
  assert rates == {"a": 3.0, "b": 1.0, "c": 0.0}
  assert measured_rates([], {"a": "ahead"}) == {}
  views = [{"address": "w1", "state": "alive", "devices": [{"memory_limit_bytes": 5},
                                                           {"memory_limit_bytes": 7}]},
           {"address": "w2", "state": "alive", "devices": [{"memory_limit_bytes": 0}]},
           {"address": "w3", "state": "dead", "devices": []}]
  assert worker_memory(views, fallback=100) == {"w1": 12, "w2": 100}


class _Zoo:
  """Block records as the zoo keeps them: two 1 MB layers blocks per chain, no KV here."""

  def block_record(self, block_id):
    return {"kind": "embed", "config": {},
            "leaves": {"w": {"shape": [1 << 18], "dtype": "float32"}}}


class _Engine:
  """What the replanner reads and calls: models, blocks, trace, relocate (moves at once)."""

  def __init__(self, placer, chains, trace):
    self.placer, self.chains, self._trace = placer, chains, trace
    self.relocated = []

  def stats(self):
    blocks = [{"key": b, "block_id": b, "worker": w} for b, w in self.placer.plan.items()]
    return {"blocks": blocks, "models": self.chains}

  def trace(self):
    return self._trace

  def relocate(self, keys, reason, to=None):
    self.relocated.append((sorted(keys), to))
    for k in keys:
      self.placer.plan[k] = to


class _Membership:
  def stats(self):
    return [{"address": "w1", "state": "alive", "devices": []},
            {"address": "w2", "state": "alive", "devices": []}]


def test_a_replan_moves_only_what_pays_and_keeps_the_rest():
  import types
  from jblock.cluster.replan import ReplanConfig, Replanner, initial_plan
  from jblock.runtime.engine import EngineConfig
  chains = {"a": ["a0", "a1"], "b": ["b0", "b1"]}
  placer = types.SimpleNamespace(plan={})
  # Compute dear, hops cheap: each chain split over both workers balances them.
  config = ReplanConfig(PlannerConfig(hop_cost_s=1e-6, bytes_per_s=1e6))
  first = initial_plan(_Zoo(), EngineConfig(), _Membership(), chains, config)
  placer.plan.update(first.primary())
  engine = _Engine(placer, chains, [])
  replanner = Replanner(engine, placer, _Zoo(), EngineConfig(), _Membership(), config,
                        lambda *_: None, plan=first)
  # Equal rates: one chain per worker balances them without a hop.
  assert all(len({placer.plan[b] for b in blocks}) == 1 for blocks in chains.values())
  assert len(set(placer.plan.values())) == 2
  # Only "a" runs now: splitting it over both workers pays; one of its blocks moves.
  engine._trace = [{"blocks": ("a1",), "items": 4, "models": ("a",), "dispatched": 0.0,
                    "done": 1.0}]
  moves = replanner.replan("a alone")
  assert len(moves) == 1 and moves[0].block_id in chains["a"] and moves[0].remove
  assert len({placer.plan[b] for b in chains["a"]}) == 2
  assert replanner.replan("a alone, again") == []  # nothing more to gain
  # Hops turn dear: joining each chain on one worker pays; the moves are applied via relocate.
  replanner.config = ReplanConfig(PlannerConfig(hop_cost_s=10.0, bytes_per_s=1e6))
  moves = replanner.replan("hops dear")
  assert moves and engine.relocated
  assert all(len({placer.plan[b] for b in blocks}) == 1 for blocks in chains.values())
  view = replanner.view()
  assert [r["reason"] for r in view["replans"]] == ["a alone", "a alone, again", "hops dear"]
  assert view["replans"][-1]["cost_after"] < view["replans"][-1]["cost_before"]
  assert replanner.replan("again") == []
