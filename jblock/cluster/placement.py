"""Locality-aware placement: which worker hosts each block, and why.

A chain's step crosses a worker boundary wherever two consecutive blocks live on different
workers; each crossing costs a network hop. Putting everything on one worker saves every hop
but serialises all compute there. The planner weighs both under a simple throughput model:

  cost = hop_cost_s * (rate-weighted cross-worker hops per second)
       + max over workers of (rate-weighted compute seconds per second on that worker)

where a block's compute per step is its bytes / `bytes_per_s` (a decode step reads every weight
once) and a block's traffic is the summed request rate of the chains through it. Placement is
subject to each worker's memory (params + KV). A hot block shared by several chains may get a
replica on a second worker when that saves the hops of the chains whose neighbours live there;
the cost model routes each chain through one copy. The runtime hosts every copy
(jblock.cluster.replan) and binds each request, at admission, to the least loaded copy
(jblock.runtime.replicas); its KV lives there, so the request sticks to it.

`plan` is pure (greedy by locality, then moves of contiguous runs of blocks) (no RPCs): inputs in, a `Plan` (hosts, routes, a reason per block) out;
`diff` lists the moves that turn one plan into another (host the new copy, drain, unhost old).
"""

import dataclasses
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
  # Defaults measured on this repository's CPU machine: a gRPC hop costs ~0.6 ms per token
  # (tools/results/grpc_overhead.json); a 0.7 MB layers block steps in ~0.54 ms
  # (tools/results/step_times_demo.json). Set both for the hardware at hand.
  hop_cost_s: float = 6e-4  # seconds one cross-worker hop of one step adds (RPC + transfer)
  bytes_per_s: float = 1.3e9  # weight bytes a worker reads per second (a step's compute time)
  memory_headroom: float = 0.9  # share of a worker's memory the planner may fill
  max_replicas: int = 1  # copies a block may have (1: no replication)
  replicate_min_share: float = 0.3  # a block is hot when it carries this share of all traffic
  improve_passes: int = 2  # run moves tried per placed block, at most (bounds the search)


@dataclasses.dataclass(frozen=True)
class PlacementInputs:
  chains: Mapping[str, Sequence[str]]  # chain (model) name -> its block ids, bottom first
  block_bytes: Mapping[str, int]  # block id -> bytes it occupies on a worker (params + KV)
  worker_memory: Mapping[str, int]  # worker address -> bytes it can hold (0: unknown, unbounded)
  rates: Mapping[str, float] = dataclasses.field(default_factory=dict)  # chain -> steps/s
  # (measured by the engine; a chain without a measurement counts as rate 1)
  compute_bytes: Mapping[str, int] = dataclasses.field(default_factory=dict)  # block id ->
  # weight bytes a step reads (its params; a block without an entry counts its block_bytes)


@dataclasses.dataclass
class Plan:
  hosts: dict[str, list[str]]  # block id -> workers holding a copy (first: the primary)
  routes: dict[str, dict[str, str]]  # chain -> block id -> the copy's worker that chain uses
  reasons: dict[str, str]  # block id -> why it lives where it does
  cost: float = 0.0  # the model's cost of this plan (lower is better)
  hops_per_s: float = 0.0  # rate-weighted cross-worker hops
  worker_load_s: dict[str, float] = dataclasses.field(default_factory=dict)  # compute s per s

  def primary(self) -> dict[str, str]:
    """Block id -> its primary worker (what a single-copy placer needs)."""
    return {b: ws[0] for b, ws in self.hosts.items()}

  def view(self) -> dict:
    """The plan as engine stats show it."""
    return {"blocks": {b: {"workers": list(ws), "reason": self.reasons.get(b, "")}
                       for b, ws in self.hosts.items()},
            "routes": {c: dict(r) for c, r in self.routes.items()},
            "cost": round(self.cost, 6), "hops_per_s": round(self.hops_per_s, 3),
            "worker_load_s": {w: round(v, 6) for w, v in self.worker_load_s.items()}}


@dataclasses.dataclass(frozen=True)
class Move:
  block_id: str
  add: tuple[str, ...]  # workers to host a new copy on (first, before anything is freed)
  remove: tuple[str, ...]  # workers to unhost it from once requests drained off them


class PlacementError(ValueError):
  """No placement fits: names the block and the memory it lacked."""


def _rate(inputs: PlacementInputs, chain: str) -> float:
  return float(inputs.rates.get(chain, 1.0))


def _cost(inputs: PlacementInputs, routes: Mapping[str, Mapping[str, str]],
          config: PlannerConfig) -> tuple[float, float, dict[str, float]]:
  """(cost, hops per second, compute seconds per second per worker) of a routing."""
  hops = 0.0
  load = {w: 0.0 for w in inputs.worker_memory}
  for chain, blocks in inputs.chains.items():
    rate, route = _rate(inputs, chain), routes[chain]
    for prev, nxt in zip(blocks, blocks[1:]):
      if route[prev] != route[nxt]:
        hops += rate
    for b in blocks:
      load[route[b]] += rate * inputs.compute_bytes.get(b, inputs.block_bytes[b]) / config.bytes_per_s
  return config.hop_cost_s * hops + max(load.values(), default=0.0), hops, load


def _capacity(inputs: PlacementInputs, config: PlannerConfig) -> dict[str, float]:
  return {w: (m * config.memory_headroom if m > 0 else float("inf"))
          for w, m in inputs.worker_memory.items()}


def _check(inputs: PlacementInputs) -> None:
  if not inputs.worker_memory:
    raise PlacementError("worker_memory: no worker to place blocks on")
  for chain, blocks in inputs.chains.items():
    for b in blocks:
      if b not in inputs.block_bytes:
        raise PlacementError(f"block_bytes: block {b[:12]} of chain {chain} has no size")
  for chain, r in inputs.rates.items():
    if r < 0:
      raise PlacementError(f"rates: chain {chain} has a negative rate {r}")


def plan(inputs: PlacementInputs, config: PlannerConfig | None = None,
         previous: Plan | None = None) -> Plan:
  """The cheapest placement found: greedy by locality, then moves of contiguous runs.

  `previous` (the plan in force) breaks ties towards where blocks already are, so a re-plan
  moves only what pays. Raises PlacementError when a block fits on no worker.
  """
  config = config or PlannerConfig()
  _check(inputs)
  capacity = _capacity(inputs, config)
  workers = sorted(inputs.worker_memory)
  traffic: dict[str, float] = {}
  chains_of: dict[str, list[str]] = {}
  for chain, blocks in inputs.chains.items():
    for b in dict.fromkeys(blocks):
      traffic[b] = traffic.get(b, 0.0) + _rate(inputs, chain)
      chains_of.setdefault(b, []).append(chain)
  where: dict[str, str] = {}
  used = {w: 0.0 for w in workers}
  before = previous.primary() if previous else {}

  def fits(b: str, w: str) -> bool:
    return used[w] + inputs.block_bytes[b] <= capacity[w]

  def routing(assign: Mapping[str, str]) -> dict[str, dict[str, str]]:
    return {c: {b: assign[b] for b in blocks} for c, blocks in inputs.chains.items()}

  # Locality first: each chain bottom-up (hot chains first, so shared bottoms land first) on
  # the worker already holding its previous block when it fits, else the emptiest that fits.
  order = sorted(inputs.chains, key=lambda c: (-_rate(inputs, c), c))
  for chain in order:
    prev = None
    for b in inputs.chains[chain]:
      if b not in where:
        options = [w for w in workers if fits(b, w)]
        if not options:
          raise PlacementError(
              f"block {b[:12]} ({inputs.block_bytes[b]} bytes) fits on no worker: free bytes "
              + ", ".join(f"{w}={capacity[w] - used[w]:.0f}" for w in workers))
        where[b] = min(options, key=lambda w: (w != before.get(b), w != prev, used[w], w))
        used[where[b]] += inputs.block_bytes[b]
      prev = where[b]

  # Then the best move of a contiguous run of a chain's blocks to another worker, while one
  # lowers the cost: splitting a chain where compute outweighs the hop, joining it back where not.
  runs = {tuple(blocks[i:j]) for blocks in inputs.chains.values()
          for i in range(len(blocks)) for j in range(i + 1, len(blocks) + 1)}
  for _ in range(config.improve_passes * max(1, len(where))):
    current = _cost(inputs, routing(where), config)[0]
    best = None
    for run in runs:
      size = sum(inputs.block_bytes[b] for b in set(run))
      for w in workers:
        moving = [b for b in set(run) if where[b] != w]
        if not moving or used[w] + sum(inputs.block_bytes[b] for b in moving) > capacity[w]:
          continue
        trial = {**where, **{b: w for b in moving}}
        cost = _cost(inputs, routing(trial), config)[0]
        if cost < current - 1e-12 and (best is None or (cost, size) < best[:2]):
          best = (cost, size, trial)
    if best is None:
      break
    where = best[2]
    used = {w: sum(inputs.block_bytes[b] for b, x in where.items() if x == w) for w in workers}

  hosts = {b: [w] for b, w in where.items()}
  routes = routing(where)
  replicated = _replicate(inputs, config, traffic, chains_of, hosts, routes, used, capacity)
  cost, hops, load = _cost(inputs, routes, config)
  reasons = {b: _reason(b, inputs, routes, chains_of, traffic, hosts, replicated)
             for b in hosts}
  return Plan(hosts, routes, reasons, cost, hops, load)


def _replicate(inputs, config, traffic, chains_of, hosts, routes, used, capacity) -> set[str]:
  """Adds copies of runs of hot shared blocks on workers where some chain's other blocks live,
  while that lowers the cost; each chain routes the run through the copy that suits it."""
  done: set[str] = set()
  if config.max_replicas < 2:
    return done
  total = sum(_rate(inputs, c) for c in inputs.chains) or 1.0

  def hot(b: str) -> bool:
    return len(chains_of[b]) >= 2 and traffic[b] / total >= config.replicate_min_share

  runs = set()  # maximal runs of consecutive hot shared blocks in some chain
  for blocks in inputs.chains.values():
    run: list[str] = []
    for b in list(blocks) + [None]:
      if b is not None and hot(b):
        run.append(b)
      elif run:
        runs.add(tuple(run))
        run = []
  while True:
    current = _cost(inputs, routes, config)[0]
    best = None
    for run in sorted(runs):
      for w in sorted(inputs.worker_memory):
        adding = [b for b in run if w not in hosts[b] and len(hosts[b]) < config.max_replicas]
        if len(adding) != len(run) or used[w] + sum(inputs.block_bytes[b] for b in run) > capacity[w]:
          continue
        trial = {c: dict(r) for c, r in routes.items()}
        for c in {c for b in run for c in chains_of[b]}:
          options = sorted({w} | {trial[c][b] for b in run})
          pick = min(options, key=lambda h: _cost(
              inputs, {**trial, c: {**trial[c], **{b: h for b in run}}}, config)[0])
          trial[c].update({b: pick for b in run})
        cost = _cost(inputs, trial, config)[0]
        if cost < current - 1e-12 and (best is None or cost < best[0]):
          best = (cost, run, w, trial)
    if best is None:
      return done
    _, run, w, trial = best
    for b in run:
      hosts[b].append(w)
      used[w] += inputs.block_bytes[b]
      done.add(b)
    routes.clear()
    routes.update(trial)


def _reason(b, inputs, routes, chains_of, traffic, hosts, replicated) -> str:
  parts = [f"traffic {traffic[b]:.3g} steps/s from {len(chains_of[b])} chain(s)"]
  for w in hosts[b]:
    users = [c for c in chains_of[b] if routes[c][b] == w]
    neighbours = set()
    for c in users:
      blocks = list(inputs.chains[c])
      i = blocks.index(b)
      neighbours.update(routes[c][n] == w for n in blocks[max(0, i - 1):i + 2] if n != b)
    local = "its chain neighbours are there" if neighbours == {True} else (
        "no neighbours" if not neighbours else "splits its chain here (balances compute)")
    parts.append(f"on {w} for {','.join(users) or 'no chain'}: {local}")
  if b in replicated:
    parts.append("replicated: a hot shared block, a copy next to each chain's neighbours saves hops")
  return "; ".join(parts)


def evaluate(inputs: PlacementInputs, hosts: Mapping[str, Sequence[str]],
             config: PlannerConfig | None = None) -> float:
  """The cost of a placement (block id -> workers holding a copy, the primary first) under
  `inputs`' rates, each chain routed through the copies that cross workers least."""
  return _cost(inputs, {c: _fewest_hops(blocks, hosts) for c, blocks in inputs.chains.items()},
               config or PlannerConfig())[0]


def _fewest_hops(blocks: Sequence[str], hosts: Mapping[str, Sequence[str]]) -> dict[str, str]:
  """Block -> the copy's worker a chain uses, crossing workers fewest times (ties: primaries)."""
  # worker -> (hops so far, path); a replica costs a hair more than the primary (ties: primaries)
  best = {w: ((i > 0) * 1e-6, [w]) for i, w in enumerate(hosts[blocks[0]])}
  for b in blocks[1:]:
    best = {w: min(((c + (p[-1] != w) + (i > 0) * 1e-6, p + [w]) for c, p in best.values()),
                   key=lambda t: t[0]) for i, w in enumerate(hosts[b])}
  path = min(best.values(), key=lambda t: t[0])[1]
  return dict(zip(blocks, path))


def diff(old: Plan | Mapping[str, Sequence[str]], new: Plan) -> list[Move]:
  """The moves from `old` to `new`: per block, the copies to host, then the ones to unhost."""
  old_hosts = old.hosts if isinstance(old, Plan) else {b: list(ws) for b, ws in old.items()}
  moves = []
  for b in sorted(set(old_hosts) | set(new.hosts)):
    before, after = old_hosts.get(b, []), new.hosts.get(b, [])
    add = tuple(w for w in after if w not in before)
    remove = tuple(w for w in before if w not in after)
    if add or remove:
      moves.append(Move(b, add, remove))
  return moves
