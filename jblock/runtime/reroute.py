"""On-the-fly rerouting: which equivalent block instance a request's next step runs through.

A model's chain position p may be served by another block (a base's, another variant's) when
an equivalence record (jblock.zoo.records) measured that substitution for this model. At each
step boundary the engine asks `decide` for the request's route — the set of substitutions it
runs with — given the instances' loads:

- a position whose own instance is overloaded (other requests through it >= its threshold) or
  not resident (being loaded or re-placed) is *needed*: the route substitutes it when a
  measured substitution set covers it, fits the tenant's budget, and its candidates are
  resident, have KV room and are not overloaded themselves;
- a substituted position whose own instance has calmed down (fewer than `return_fraction` of
  its threshold) is *released*: the route goes back to the model's own block;
- in between nothing changes (hysteresis: no flapping at the threshold);
- a move that needs a KV recompute while the request's current route still runs (a move out of
  an overloaded instance mid-decode, or a return home) is made only when the tokens the request
  has left to generate are at least `replay_min_remaining` times the tokens the replay re-runs:
  a short request finishes where it is rather than paying a replay. Before a request's first
  prefill nothing is cached, so its route is chosen freely at admission.

Budget: `accuracy_budget` is the top-1 disagreement (1 - top-1 agreement with the unmodified
model on the record's calibration set) a tenant accepts. Only substitution sets some record
measured as a whole (position + context) are used, at their worst measured value, so a route
never costs more than the budget by measurement; a zero (or absent) budget never reroutes.

KV coordination for a move (a layers position changes instance mid-request): `reuse` copies
the pages the request's earlier tokens wrote in the old instance into the new one when the
record says the blocks are interchangeable (their outputs differ by at most
`kv_reuse_max_rel_l2` relative L2 on calibration data); otherwise `recompute` rebuilds the KV
by replaying the request's tokens through its new chain (jblock.runtime.replay).

Pure: no engine, no devices; the engine calls it under its lock.
"""

import dataclasses
from typing import Iterable, Mapping

from jblock.zoo import records as records_lib

REUSE, RECOMPUTE = "reuse", "recompute"

Route = frozenset  # of (position, candidate block id)
_EPS = 1e-12  # 1 - top1 in floating point: 0.97 must fit a budget of 0.03


@dataclasses.dataclass(frozen=True)
class RerouteConfig:
  overload_requests: int = 0  # other requests through an instance that make it overloaded (0 = its batch size)
  return_fraction: float = 0.5  # route back when the own instance has fewer than this share of that
  kv_reuse_max_rel_l2: float = 0.02  # blocks whose outputs differ by at most this share their KV
  default_budget: float = 0.0  # budget of requests that name none (an open server): 0 = never reroute
  replay_min_remaining: float = 1.0  # a replaying move needs tokens left >= this x tokens replayed (0 = always)

  def __post_init__(self):
    if self.overload_requests < 0:
      raise ValueError(f"overload_requests must be >= 0, got {self.overload_requests}")
    if not 0.0 <= self.return_fraction <= 1.0:
      raise ValueError(f"return_fraction must be in [0, 1], got {self.return_fraction}")
    if self.replay_min_remaining < 0:
      raise ValueError(f"replay_min_remaining must be >= 0, got {self.replay_min_remaining}")
    if not 0.0 <= self.default_budget <= 1.0:
      raise ValueError(f"default_budget must be in [0, 1], got {self.default_budget}")


@dataclasses.dataclass(frozen=True)
class Measured:
  """One measured substitution set for a model: its worst top-1 disagreement and block error."""
  route: Route
  disagreement: float  # 1 - top-1 agreement with the unmodified model
  block_rel_l2: dict[int, float]  # position -> that block's output error (where measured)


@dataclasses.dataclass(frozen=True)
class Load:
  """What the engine sees of one block instance right now."""
  requests: int  # active requests routed through it (the deciding request excluded)
  threshold: int  # requests at which it counts as overloaded
  resident: bool = True  # loaded and available
  kv_room: bool = True  # can lease KV pages for one more request


@dataclasses.dataclass(frozen=True)
class Move:
  position: int
  source: str  # block id the position ran through
  target: str  # block id it runs through now
  kv: str  # REUSE or RECOMPUTE (layers moves only; other kinds hold no KV)


@dataclasses.dataclass(frozen=True)
class Decision:
  route: Route
  moves: tuple[Move, ...]
  cost: float  # measured disagreement of the route


def measured_routes(recs: Iterable[Mapping], chain: list[str]) -> dict[Route, Measured]:
  """The substitution sets the records measured for a model with this chain (others are stale)."""
  digest = records_lib.chain_digest(chain)
  out: dict[Route, Measured] = {}
  for r in recs:
    if r.get("model_chain") != digest or r["candidate"] == chain[r["position"]]:
      continue
    if r.get("delta") or any(b == chain[int(p)] for p, b in r.get("context", [])):
      continue  # a LoRA delta dropped: served by an assembled model, not by moving instances
    route = Route({(int(r["position"]), r["candidate"])} |
                  {(int(p), b) for p, b in r.get("context", [])})
    m = r["metrics"]
    loss = 1.0 - float(m["top1"])
    errors = {int(r["position"]): float(m.get("block_rel_l2", float("inf")))}
    if route in out:  # measured more than once (other calibration sets): keep the worst
      old = out[route]
      errors = {p: max(e, old.block_rel_l2.get(p, 0.0)) for p, e in errors.items()} | {
          p: e for p, e in old.block_rel_l2.items() if p not in errors}
      loss = max(loss, old.disagreement)
    out[route] = Measured(route, loss, errors)
  return out


def candidates_of(measured: Mapping[Route, Measured]) -> set[str]:
  return {b for route in measured for _, b in route}


def decide(chain: list[str], current: Route, measured: Mapping[Route, Measured],
           budget: float | None, loads: Mapping[str, Load], config: RerouteConfig,
           kinds: list[str] | None = None, cached_tokens: int = 0,
           remaining_tokens: int | None = None) -> Decision:
  """The request's route for its next step (see the module docstring). `cached_tokens`: the
  request's tokens in KV now (what a recompute replays); `remaining_tokens`: tokens it has left
  to generate (None = unknown: moves are never held back)."""
  budget = config.default_budget if budget is None else budget
  current = Route(current)
  if budget <= 0.0:
    routes = [Route()]  # a zero budget never reroutes (and a rerouted request goes home)
  else:
    routes = [Route()] + [m.route for m in measured.values() if m.disagreement <= budget + _EPS]

  def state(block: str) -> str:
    load = loads.get(block)
    if load is None or not load.resident:
      return "needed"
    if load.requests >= load.threshold:
      return "needed"
    if load.requests < config.return_fraction * load.threshold:
      return "released"
    return "steady"

  def usable(block: str, moving_in: bool) -> bool:
    load = loads.get(block)
    if load is None or not load.resident:
      return False
    return not moving_in or (load.kv_room and load.requests < load.threshold)

  on_now_at = dict(current)  # position -> block the request runs through there now
  on_now = set(on_now_at)
  best, best_score = None, None
  for route in routes:
    if not all(usable(b, (p, b) not in current) for p, b in route):
      continue
    subbed = {p for p, _ in route}
    penalty = 0
    for p, own in enumerate(chain):
      s = state(own)
      if p in subbed:
        penalty += 0 if s == "needed" or (s == "steady" and p in on_now) else 1
      else:
        penalty += 1 if s == "needed" or (s == "steady" and p in on_now) else 0
    cost = measured[route].disagreement if route else 0.0
    score = (penalty, route != current, cost, sorted(route))
    if best_score is None or score < best_score:
      best, best_score = route, score
  if best is None:  # nothing usable, not even the own chain: stay where the request is
    best = current
  moves = _moves(chain, current, best, measured, config, kinds)
  if (best != current and cached_tokens and remaining_tokens is not None
      and any(m.kv == RECOMPUTE for m in moves)
      and current in routes
      and all(usable(on_now_at.get(p, own), False) for p, own in enumerate(chain))
      and remaining_tokens < config.replay_min_remaining * cached_tokens):
    best, moves = current, ()  # the current route still runs: not worth a replay this late
  return Decision(best, moves, measured[best].disagreement if best in measured else 0.0)


def _moves(chain, current: Route, new: Route, measured, config: RerouteConfig,
           kinds) -> tuple[Move, ...]:
  old_at, new_at = dict(current), dict(new)
  moves = []
  for p in sorted(set(old_at) | set(new_at)):
    source, target = old_at.get(p, chain[p]), new_at.get(p, chain[p])
    if source == target:
      continue
    # Interchangeable KV: the block's measured output error in this route, else alone.
    sub = new if p in new_at else current
    block = new_at.get(p, old_at.get(p))
    errors = [measured[r].block_rel_l2[p] for r in (sub, Route({(p, block)}))
              if r in measured and p in measured[r].block_rel_l2]
    err = errors[0] if errors else float("inf")
    kv = REUSE if err <= config.kv_reuse_max_rel_l2 else RECOMPUTE
    if kinds is not None and kinds[p] != "layers":
      kv = REUSE  # no KV at this position: nothing to coordinate
    moves.append(Move(p, source, target, kv))
  return tuple(moves)
