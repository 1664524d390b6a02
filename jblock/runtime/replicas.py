"""Block replicas: several instances of one block id, requests balanced across them.

A hot shared block may have copies besides its primary instance (the one in the models'
chains, keyed by its block id): keys `<block_id>#1`, `<block_id>#2`, ..., each with its own KV
page pool, on other workers or on the local mesh. A replica computes exactly what its primary
does, so any request may use it whatever its tenant's accuracy budget.

A request is bound to one copy per chain position when it is admitted (nothing is cached yet,
so the choice is free): the least loaded one (active requests through it over its batch size).
Its steps then run through that copy; rows bound to different copies batch separately. A copy
being removed is *draining*: no new request is bound to it, its requests finish there (or are
moved off with a KV replay when the drain times out), then it is unhosted.

Pure bookkeeping (no devices, no locks): the engine calls it under its lock.
"""

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

SEPARATOR = "#"


def replica_key(block_id: str, n: int) -> str:
  """The instance key of copy `n` of a block (0: the primary, keyed by the block id)."""
  if n < 0:
    raise ValueError(f"replica number must be >= 0, got {n}")
  return block_id if n == 0 else f"{block_id}{SEPARATOR}{n}"


def block_of(key: str) -> str:
  """The block id of an instance key (a replica's or the primary's)."""
  return key.split(SEPARATOR, 1)[0]


def next_key(block_id: str, taken: Iterable[str]) -> str:
  """The first replica key of the block that is not in `taken`."""
  taken = set(taken)
  n = 1
  while replica_key(block_id, n) in taken:
    n += 1
  return replica_key(block_id, n)


@dataclasses.dataclass(frozen=True)
class Option:
  """One copy as the binding rule sees it."""
  key: str
  requests: int  # active requests bound through it now
  batch_size: int
  usable: bool = True  # resident, not draining, KV room for one more request


def choose(options: Sequence[Option]) -> str | None:
  """The copy a new request is bound to: the usable one with the lowest requests / batch size
  (ties: the earliest listed, the primary first). None when no copy is usable."""
  usable = [(o.requests / max(1, o.batch_size), i, o.key) for i, o in enumerate(options)
            if o.usable]
  return min(usable)[2] if usable else None


class Replicas:
  """Which replicas each block has and which are draining."""

  def __init__(self):
    self._copies: dict[str, list[str]] = {}  # block id -> replica keys (primary excluded)
    self.draining: set[str] = set()  # bound to by no new request
    self.removing: set[str] = set()  # a drop_replica is under way

  def __bool__(self) -> bool:
    return any(self._copies.values())

  def add(self, block_id: str, key: str) -> None:
    self._copies.setdefault(block_id, []).append(key)

  def remove(self, key: str) -> None:
    keys = self._copies.get(block_of(key), [])
    if key in keys:
      keys.remove(key)
    if not keys:
      self._copies.pop(block_of(key), None)
    self.draining.discard(key)
    self.removing.discard(key)

  def of(self, block_id: str) -> list[str]:
    """The replica keys of a block (not its primary)."""
    return list(self._copies.get(block_id, ()))

  def bindable(self, block_id: str) -> list[str]:
    """The copies a new request may be bound to: the primary, then the non-draining replicas."""
    return [block_id] + [k for k in self._copies.get(block_id, ()) if k not in self.draining]


def bind(chain: Sequence[Any], replicas: Replicas, options_for) -> dict[int, Any]:
  """Chain position -> the copy a new request runs through there, for positions whose block has
  replicas and whose chosen copy is not the chain's own instance. `options_for(keys)` gives the
  Options (with loads) and instances of those keys: (list[Option], {key: instance})."""
  out = {}
  for p, inst in enumerate(chain):
    if not replicas.of(inst.key):
      continue
    options, instances = options_for(replicas.bindable(inst.key))
    pick = choose(options)
    if pick is not None and pick != inst.key:
      out[p] = instances[pick]
  return out


def stats(instances: Mapping[str, Any], replicas: Replicas, through: Mapping[str, int]
          ) -> dict[str, list[dict]]:
  """Block id -> each copy: key, where it lives, requests bound now, batches and items run."""
  out = {}
  for block_id in sorted(replicas._copies):
    rows = []
    for key in [block_id] + replicas.of(block_id):
      inst = instances.get(key)
      if inst is None:
        continue
      rows.append({"key": key, "placement": inst.address or inst.placement,
                   "requests": through.get(key, 0), "batches_run": inst.batches_run,
                   "items_run": inst.items_run, "draining": key in replicas.draining})
    out[block_id] = rows
  return out
