"""The rerouting policy (jblock.runtime.reroute): routes from records, budgets and loads."""

import pytest

from jblock.runtime import reroute
from jblock.runtime.reroute import Load, RerouteConfig, Route, decide, measured_routes
from jblock.zoo import records

CHAIN = ["e" * 64, "a" * 64, "b" * 64, "h" * 64]
BASE = ["E" * 64, "A" * 64, "B" * 64, "H" * 64]
KINDS = ["embed", "layers", "layers", "head"]


def _record(position, top1, rel_l2=0.01, context=(), chain=CHAIN):
  return {"model_chain": records.chain_digest(chain), "position": position,
          "block": chain[position], "candidate": BASE[position],
          "context": [[p, BASE[p]] for p in context],
          "metrics": {"top1": top1, "kl": 0.1, "block_rel_l2": rel_l2}}


RECS = [_record(1, 0.99), _record(2, 0.90, rel_l2=0.2), _record(2, 0.95, context=(1,)),
        _record(1, 0.97)]  # position 1 measured twice (two calibration sets)


def _loads(**over):
  loads = {b: Load(0, 4) for b in CHAIN + BASE}
  loads.update(over)
  return loads


def test_measured_routes_keep_the_worst_measurement_and_skip_stale_records():
  stale = _record(1, 1.0, chain=["x" * 64] + CHAIN[1:])
  m = measured_routes(RECS + [stale], CHAIN)
  assert set(m) == {Route({(1, BASE[1])}), Route({(2, BASE[2])}),
                    Route({(1, BASE[1]), (2, BASE[2])})}
  assert m[Route({(1, BASE[1])})].disagreement == pytest.approx(0.03)
  assert m[Route({(1, BASE[1]), (2, BASE[2])})].disagreement == pytest.approx(0.05)


def test_zero_budget_never_reroutes_and_budget_bounds_the_route():
  m = measured_routes(RECS, CHAIN)
  busy = _loads(**{CHAIN[1]: Load(9, 4), CHAIN[2]: Load(9, 4)})
  cfg = RerouteConfig()
  for budget in (0.0, None):  # None: the default budget, 0
    assert decide(CHAIN, Route(), m, budget, busy, cfg, KINDS).route == Route()
  # Both own layers blocks overloaded: the budget picks how much may move.
  assert decide(CHAIN, Route(), m, 0.02, busy, cfg, KINDS).route == Route()
  assert decide(CHAIN, Route(), m, 0.03, busy, cfg, KINDS).route == {(1, BASE[1])}
  both = decide(CHAIN, Route(), m, 0.05, busy, cfg, KINDS)
  assert both.route == {(1, BASE[1]), (2, BASE[2])} and both.cost == pytest.approx(0.05)
  assert [(mv.position, mv.kv) for mv in both.moves] == [(1, "reuse"), (2, "reuse")]
  # Every decision stays within its budget.
  for budget in (0.01, 0.03, 0.04, 0.05, 0.1, 1.0):
    assert decide(CHAIN, Route(), m, budget, busy, cfg, KINDS).cost <= budget + 1e-12


def test_not_resident_overload_hysteresis_and_route_back():
  m = measured_routes(RECS, CHAIN)
  cfg = RerouteConfig()
  one = Route({(1, BASE[1])})
  absent = _loads(**{CHAIN[1]: Load(0, 4, resident=False)})
  assert decide(CHAIN, Route(), m, 0.1, absent, cfg, KINDS).route == one
  assert decide(CHAIN, Route(), m, 0.1, _loads(), cfg, KINDS).route == Route()  # not needed
  steady = _loads(**{CHAIN[1]: Load(3, 4)})  # between half and the threshold: no change
  assert decide(CHAIN, one, m, 0.1, steady, cfg, KINDS).route == one
  assert decide(CHAIN, Route(), m, 0.1, steady, cfg, KINDS).route == Route()
  back = decide(CHAIN, one, m, 0.1, _loads(**{CHAIN[1]: Load(1, 4)}), cfg, KINDS)
  assert back.route == Route() and [(mv.source, mv.target) for mv in back.moves] == [
      (BASE[1], CHAIN[1])]
  # A budget lowered to zero brings a rerouted request home.
  assert decide(CHAIN, one, m, 0.0, steady, cfg, KINDS).route == Route()
  # The candidate must be resident, have KV room and not be overloaded itself.
  busy = {CHAIN[1]: Load(9, 4)}
  for cand in (Load(0, 4, resident=False), Load(0, 4, kv_room=False), Load(4, 4)):
    assert decide(CHAIN, Route(), m, 0.1, _loads(**busy, **{BASE[1]: cand}), cfg,
                  KINDS).route == Route()


def test_a_replaying_move_waits_for_enough_tokens_left():
  m = measured_routes(RECS, CHAIN)
  cfg = RerouteConfig(kv_reuse_max_rel_l2=0.0)  # every layers move replays
  one = Route({(1, BASE[1])})
  calm, busy = _loads(**{CHAIN[1]: Load(1, 4)}), _loads(**{CHAIN[1]: Load(9, 4)})
  # Home is calm, but 3 tokens left do not pay for replaying 20: it finishes where it is.
  assert decide(CHAIN, one, m, 0.1, calm, cfg, KINDS, cached_tokens=20,
                remaining_tokens=3).route == one
  back = decide(CHAIN, one, m, 0.1, calm, cfg, KINDS, cached_tokens=20, remaining_tokens=20)
  assert back.route == Route() and [mv.kv for mv in back.moves] == ["recompute"]
  # The same holds for a move out of an overloaded instance mid-decode; at admission (nothing
  # cached) it moves at once.
  assert decide(CHAIN, Route(), m, 0.1, busy, cfg, KINDS, cached_tokens=20,
                remaining_tokens=3).route == Route()
  assert decide(CHAIN, Route(), m, 0.1, busy, cfg, KINDS, cached_tokens=0,
                remaining_tokens=3).route == one
  # A route that no longer runs (its block left) or a budget gone to zero moves regardless.
  gone = _loads(**{CHAIN[1]: Load(1, 4), BASE[1]: Load(0, 4, resident=False)})
  assert decide(CHAIN, one, m, 0.1, gone, cfg, KINDS, cached_tokens=20,
                remaining_tokens=1).route == Route()
  assert decide(CHAIN, one, m, 0.0, calm, cfg, KINDS, cached_tokens=20,
                remaining_tokens=1).route == Route()
  always = RerouteConfig(kv_reuse_max_rel_l2=0.0, replay_min_remaining=0.0)
  assert decide(CHAIN, one, m, 0.1, calm, always, KINDS, cached_tokens=20,
                remaining_tokens=1).route == Route()


def test_kv_is_reused_only_for_interchangeable_blocks():
  m = measured_routes(RECS, CHAIN)
  busy = _loads(**{CHAIN[2]: Load(9, 4)})
  d = decide(CHAIN, Route(), m, 0.1, busy, RerouteConfig(kv_reuse_max_rel_l2=0.05), KINDS)
  assert d.route == {(2, BASE[2])} and d.moves[0].kv == reroute.RECOMPUTE  # rel L2 0.2
  d = decide(CHAIN, Route(), m, 0.1, busy, RerouteConfig(kv_reuse_max_rel_l2=0.5), KINDS)
  assert d.moves[0].kv == reroute.REUSE


def test_bad_config_is_refused():
  with pytest.raises(ValueError, match="return_fraction"):
    RerouteConfig(return_fraction=2.0)
  with pytest.raises(ValueError, match="default_budget"):
    RerouteConfig(default_budget=-1.0)
  with pytest.raises(ValueError, match="replay_min_remaining"):
    RerouteConfig(replay_min_remaining=-1.0)
