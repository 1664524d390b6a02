"""Placement in a running cluster: the planner's inputs gathered, plans applied as moves.

Block bytes come from the zoo (params, plus the KV pool a layers block is given); worker memory
from the workers' heartbeats (or a configured size where the platform does not say); traffic
from the engine's trace (steps per second of each chain, counted at its last block). A re-plan
runs when asked (a worker joined, load shifted): if the new plan beats the one in force by
`min_gain` under the current rates, the plan's copies are applied block by block:

- a copy on a worker that gains one is a replica (`Engine.add_replica`, key `<block id>#n`,
  placed on that worker): new requests are balanced over the copies from then on;
- a replica on a worker that loses it is drained (`Engine.drop_replica`: no new requests, its
  own finish there within `drain_s`, the rest replay onto the primary) and unhosted;
- a primary on a worker that loses it moves (`Engine.relocate`: host the new copy, pause and
  replay the requests through it, unhost old), after a replica on its target was drained.

Moves stay pause + replay: the primary is the instance in every model's chain, so a drain-style
move would mean re-cutting every chain. With `PlannerConfig.max_replicas=1` (the default) no
replica is planned. The planner routes each chain through one copy; the engine balances
requests over all copies by load, whatever their model.
"""

import dataclasses
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jblock.blocks import LAYERS
from jblock.cluster import placement
from jblock.cluster.placement import Plan, PlacementInputs, PlannerConfig
from jblock.runtime import replicas as replicas_lib


@dataclasses.dataclass(frozen=True)
class ReplanConfig:
  planner: PlannerConfig = PlannerConfig()  # hop cost, compute speed, memory headroom
  worker_memory_bytes: int = 0  # memory per worker where heartbeats report none (0: unbounded)
  min_gain: float = 0.1  # a re-plan moves blocks only when it lowers the cost by this share
  interval_s: float = 0.0  # re-plan this often under the rates of the last interval (0: only
  # when asked); with it on, a worker joining also triggers a re-plan
  on_join: bool = False  # re-plan when a worker joins (launch.coordinator turns it on)
  drain_s: float = 30.0  # a removed replica's requests finish there this long, then replay


def param_bytes(zoo, block_id: str) -> int:
  leaves = zoo.block_record(block_id)["leaves"].values()
  return sum(int(np.prod(l["shape"])) * np.dtype(l["dtype"]).itemsize for l in leaves)


def block_bytes(zoo, block_id: str, kv_pages: int, page_size: int) -> int:
  """Bytes a block occupies on a worker: its params and, for a layers block, its KV pool."""
  record = zoo.block_record(block_id)
  leaves = record["leaves"].values()
  params = param_bytes(zoo, block_id)
  if record["kind"] != LAYERS or not leaves:
    return params
  c = record["config"]
  itemsize = max(np.dtype(l["dtype"]).itemsize for l in leaves)
  return params + 2 * c["num_layers"] * kv_pages * c["num_kv_heads"] * page_size * c["head_dim"] * itemsize


def worker_memory(views: Sequence[Mapping[str, Any]], fallback: int = 0) -> dict[str, int]:
  """Live worker address -> device memory it reported (summed over devices), else `fallback`."""
  out = {}
  for v in views:
    if v.get("state", "alive") != "alive":
      continue
    limit = sum(int(d.get("memory_limit_bytes", 0)) for d in v.get("devices", []))
    out[v["address"]] = limit or fallback
  return out


def measured_rates(trace: Sequence[Mapping[str, Any]], last_blocks: Mapping[str, str]
                   ) -> dict[str, float]:
  """Chain -> steps per second over the trace window: items of the batches through the
  chain's last block (short id), split evenly among the models of a shared batch."""
  if not trace:
    return {}
  span = max(t["done"] for t in trace) - min(t["dispatched"] for t in trace)
  if span <= 0:
    return {}
  counts = {c: 0.0 for c in last_blocks}
  for t in trace:
    for chain, last in last_blocks.items():
      if last[:12] in t["blocks"] and chain in t["models"]:
        counts[chain] += t["items"] / len(t["models"])
  return {c: n / span for c, n in counts.items()}


def placement_inputs(zoo, engine_config, membership, config: ReplanConfig,
                     chains: Mapping[str, Sequence[str]],
                     rates: Mapping[str, float] | None = None) -> PlacementInputs:
  """What the planner weighs: blocks' bytes (params + KV pool) and params, workers' memory."""
  sizes = {b: block_bytes(zoo, b, engine_config.kv_pages_for(b), engine_config.page_size)
           for blocks in chains.values() for b in blocks}
  memory = worker_memory(membership.stats(), config.worker_memory_bytes)
  params = {b: param_bytes(zoo, b) for b in sizes}
  return PlacementInputs(dict(chains), sizes, memory, dict(rates or {}), params)


def initial_plan(zoo, engine_config, membership, chains: Mapping[str, Sequence[str]],
                 config: ReplanConfig | None = None,
                 kept: Mapping[str, Sequence[str]] | None = None) -> Plan:
  """The plan before any traffic was measured (every chain at the same rate): where the
  engine's instances are first hosted, before the engine (and its Replanner) exists. `kept`:
  block id -> workers already hosting it (they outlived a coordinator); ties go to them, so
  a restarted coordinator adopts those blocks instead of loading them again."""
  config = config or ReplanConfig()
  previous = Plan({b: list(ws) for b, ws in kept.items()}, {}, {}) if kept else None
  return placement.plan(placement_inputs(zoo, engine_config, membership, config, chains),
                        config.planner, previous=previous)


class Replanner:
  """Keeps the placement in force, its reasons, and re-plans on request."""

  def __init__(self, engine, placer, zoo, engine_config, membership,
               config: ReplanConfig | None = None, progress: Callable[[str], None] = print,
               plan: Plan | None = None):
    """`plan`: the placement in force (initial_plan's, when the engine was built on it)."""
    self.engine, self.placer, self.zoo, self.membership = engine, placer, zoo, membership
    self.engine_config = engine_config
    self.config = config or ReplanConfig()
    self.progress = progress
    self.plan: Plan | None = plan
    self.history: list[dict] = []  # latest re-plans: when, why, moves, costs
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def start(self) -> None:
    """Re-plans every `interval_s` on a thread (nothing when it is 0)."""
    if self.config.interval_s > 0 and self._thread is None:
      self._thread = threading.Thread(target=self._every, name="jblock-replan", daemon=True)
      self._thread.start()

  def stop(self) -> None:
    self._stop.set()

  def _every(self) -> None:
    interval = self.config.interval_s
    while not self._stop.wait(interval):
      self.replan_safely("periodic", since=time.perf_counter() - interval)

  def replan_safely(self, reason: str, since: float | None = None) -> None:
    """A re-plan whose failure (a worker lost meanwhile, a plan that no longer fits) is kept in
    the history instead of raised: placement stays as it is."""
    try:
      self.replan(reason, since)
    except Exception as e:
      self.history = (self.history + [{"at": time.time(), "reason": reason,
                                       "failed": f"{type(e).__name__}: {e}"}])[-16:]

  def inputs(self, chains: Mapping[str, Sequence[str]], rates: Mapping[str, float] | None = None
             ) -> PlacementInputs:
    return placement_inputs(self.zoo, self.engine_config, self.membership, self.config, chains,
                            rates)

  def _planner_config(self) -> PlannerConfig:
    return self.config.planner

  def copies(self) -> dict[str, dict[str, str]]:
    """Block id -> {instance key: worker} of every copy hosted now (the primary's key first)."""
    out: dict[str, dict[str, str]] = {}
    block_of = replicas_lib.block_of
    for key in sorted(self.placer.plan, key=lambda k: (block_of(k), k != block_of(k), k)):
      out.setdefault(block_of(key), {})[key] = self.placer.plan[key]
    return out

  def _chains(self) -> dict[str, list[str]]:
    stats = self.engine.stats()
    id_of = {b["key"]: b["block_id"] for b in stats["blocks"]}
    return {m: [id_of[k] for k in keys] for m, keys in stats["models"].items()}

  def replan(self, reason: str, since: float | None = None, wait_s: float = 300.0
             ) -> list[placement.Move]:
    """Re-plans with the rates measured over the trace (batches dispatched after `since`, a
    time.perf_counter(), when given) and the live workers; applies the moves when they pay.
    Returns the moves applied (empty when the plan in force stays)."""
    with self._lock:
      chains = self._chains()
      trace = [t for t in self.engine.trace() if since is None or t["dispatched"] >= since]
      rates = measured_rates(trace, {m: bl[-1] for m, bl in chains.items()})
      inputs = self.inputs(chains, rates)
      config = self._planner_config()
      current = {b: list(c.values()) for b, c in self.copies().items()
                 if b in inputs.block_bytes}
      fresh = placement.plan(inputs, config, previous=self.plan)
      entry = {"at": time.time(), "reason": reason, "rates": {c: round(r, 3) for c, r in rates.items()},
               "cost_before": None, "cost_after": round(fresh.cost, 6), "moves": []}
      live = set(inputs.worker_memory)
      if all(set(ws) <= live for ws in current.values()) and set(current) == set(fresh.hosts):
        before = placement.evaluate(inputs, current, config)
        entry["cost_before"] = round(before, 6)
        if fresh.cost >= before * (1 - self.config.min_gain):
          entry["kept"] = "the plan in force is within min_gain of the best found"
          self.history = (self.history + [entry])[-16:]
          return []
      moves = self.apply(fresh.hosts, f"re-planned ({reason})", wait_s)
      self.plan = fresh
      entry["moves"] = [dataclasses.asdict(m) for m in moves]
      self.history = (self.history + [entry])[-16:]
      if moves:
        self.progress(f"jblock: re-planned ({reason}): {len(moves)} block(s) moved")
      return moves

  def apply(self, hosts: Mapping[str, Sequence[str]], reason: str, wait_s: float = 300.0
            ) -> list[placement.Move]:
    """Makes the hosted copies those of `hosts` (block id -> workers, the primary's first):
    replicas hosted, then replicas drained and unhosted, then primaries moved. Blocks not in
    `hosts` stay as they are. Returns the moves made."""
    copies = self.copies()
    unknown = sorted(b[:12] for b in hosts if b not in copies)
    if unknown:
      raise ValueError(f"hosts: blocks {', '.join(unknown)} are not hosted by this engine")
    empty = sorted(b[:12] for b, ws in hosts.items() if not ws or len(set(ws)) != len(ws))
    if empty:
      raise ValueError(f"hosts: blocks {', '.join(empty)} need distinct workers, at least one")
    moves = placement.diff({b: list(copies[b].values()) for b in hosts}, Plan(
        {b: list(ws) for b, ws in hosts.items()}, {}, {}))
    relocate: dict[str, list[str]] = {}  # target worker -> primaries moving there
    drops: list[str] = []
    for m in moves:
      have = copies[m.block_id]  # key -> worker
      add, remove = list(m.add), set(m.remove)
      primary_leaves = have[m.block_id] in remove
      target = None
      if primary_leaves:
        target = add.pop(0) if add else next(w for w in hosts[m.block_id] if w in have.values())
      for worker in add:
        key = replicas_lib.next_key(m.block_id, list(have) + list(self.placer.plan))
        self.placer.placed(key, worker)  # the remote factory hosts it there
        try:
          self.engine.add_replica(m.block_id, key)
        except Exception:
          self.placer.plan.pop(key, None)
          raise
        have[key] = worker
      for key, worker in have.items():
        if key != m.block_id and (worker in remove or worker == target):
          drops.append(key)  # the primary's target must be free of the block first
      if target is not None:
        relocate.setdefault(target, []).append(m.block_id)
    for key in drops:
      self.engine.drop_replica(key, timeout=self.config.drain_s)
    keys = {b["block_id"]: b["key"] for b in self.engine.stats()["blocks"]
            if replicas_lib.block_of(b["key"]) != b["block_id"] or b["key"] == b["block_id"]}
    for to, moving in sorted(relocate.items()):
      thread = self.engine.relocate([keys[b] for b in moving], reason, to=to)
      if thread is not None:
        thread.join(wait_s)
    return moves

  def view(self) -> dict:
    """Engine stats' placement field: where each block lives and why, and the latest re-plans."""
    out = self.plan.view() if self.plan else {}
    live = dict(self.placer.plan)
    copies = self.copies()
    for b, entry in out.get("blocks", {}).items():
      if b in live and live[b] not in entry["workers"]:
        entry["now_on"] = live[b]  # moved since (its worker died, or a later load)
      if len(copies.get(b, {})) > 1:
        entry["copies"] = dict(copies[b])  # instance key -> worker
    out["replans"] = list(self.history)
    out["config"] = dataclasses.asdict(self.config)
    return out
