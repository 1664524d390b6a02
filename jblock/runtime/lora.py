"""Adapter banks: LoRA delta blocks resident in fixed slots of their base layers instances.

Every layers instance some adapter touches holds a bank (`inst.lora_bank`): for each of its
projections, `a` [S, R, in] and `b` [S, R, out] — S slots, factors zero-padded to the max rank
R, the scaling folded into `b` — so the shapes, and the compiled segment functions, never change
when adapters come and go. Slots are engine-wide: an adapter resident in slot s occupies slot s
of every banked instance (zeros where it has no delta), so one per-row index (StepMeta.adapter)
serves every layers block of a fused segment.

More adapters may be registered than there are slots. Their factors stay in host memory; a
request's admission acquires its adapter's slot (a hit when resident, else a swap into a free
slot or the least recently used one that no running request holds) and pins it until the request
finishes, so a slot is never rewritten under a batch that reads it. The host->device copy of an
adapter's factors is staged before the engine lock is taken (`stage`, at submit); under the lock
a swap only dispatches the (asynchronous) write of staged device arrays into the slot.

Each batch sends the bank columns its adapters use (`columns`: the slots of its rows, each with
its adapter's rank, padded to a power-of-two bucket), so the delta costs what the batch's ranks
cost, not slots x max rank; the buckets are compiled at warm-up.

A base block hosted on a worker holds its bank there (a delta lives where its base block lives):
the remote instance asks its worker to hold a bank of this shape (`ensure_lora_bank`) and a swap
sends the slot's factors over (`install_adapter`, one RPC per banked instance; the worker writes
them with `write_slot`).
"""

import bisect
import collections
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jblock.blocks import Block
from jblock.convert import full_delta
from jblock.convert.full_delta import QDELTA
from jblock.errors import InvalidRequestError, JBlockError
from jblock.models.lora import TARGETS
from jblock.runtime import delta_bank


def _write_entry(entry, slot, factor):
  """Slot `slot` of every array in a bank entry := the factor's array there (zeros if absent)."""
  out = {}
  for key, arr in entry.items():
    f = factor.get(key) if factor is not None else None
    if isinstance(arr, dict):
      out[key] = _write_entry(arr, slot, f)
    else:
      value = f.astype(arr.dtype) if f is not None else jnp.zeros(arr.shape[1:], arr.dtype)
      out[key] = arr.at[slot].set(value)
  return out


def _write_slot(bank, slot, factors):
  """Slot `slot` of every bank entry := factors[path] (LoRA a [R, in] / b [R, out], or a
  compressed delta's arrays and leaves: jblock.models.deltas), zeros where absent."""
  return {p: _write_entry(e, slot, factors.get(p)) for p, e in bank.items()}


_write_copy = jax.jit(_write_slot)
# Donated: the slot is written in place instead of copying the whole bank (tens of MB on a real
# base). Only for callers that hold the lock every dispatch reading the bank takes.
_write_in_place = jax.jit(_write_slot, donate_argnums=(0,))


def _spec(x) -> tuple:
  """x's partition spec, one entry per dim (None = replicated)."""
  spec = tuple(getattr(x.sharding, "spec", None) or ())
  return spec + (None,) * (x.ndim - len(spec))


def has_lora(bank) -> bool:
  """The bank holds LoRA factors (a worker-hosted instance's bank lists only its LoRA targets),
  so one-token batches send it their bank columns; a bank of compressed deltas alone does not."""
  return bool(bank) and any(e is None or "a" in e for e in bank.values())


def column_buckets(slots: int, max_rank: int) -> tuple[int, ...]:
  """Compiled sizes of a batch's bank-column list: powers of two from 8 up to slots x max_rank."""
  total = slots * max_rank
  out, c = [], min(8, total)
  while c < total:
    out.append(c)
    c *= 2
  return tuple(out) + (total,)


def projections(params: dict[str, Any]) -> dict[str, tuple[int, int]]:
  """'layer_k/attn/q' -> (in, out) for every LoRA-able projection of a layers block."""
  out = {}
  for layer, sub in params.items():
    for target in TARGETS:
      node = sub
      for p in target.split("/"):
        node = node.get(p) if isinstance(node, dict) else None
      if isinstance(node, dict) and "kernel" in node:
        d_in, d_out = node["kernel"].shape
        out[f"{layer}/{target}"] = (int(d_in), int(d_out))
  return out


def _remote(inst) -> bool:
  """A block instance hosted on a worker (its bank lives there)."""
  return inst.remote


def _delta_shapes(delta: Block) -> dict[str, tuple[int, int]]:
  """(in, out) of every projection a delta block touches, read off its factors (a [in, r],
  b [r, out]); the worker checks them against its base kernels."""
  out = {}
  for path in delta.config["ranks"]:
    node = delta.params
    for p in path.split("/"):
      node = node[p]
    out[path] = (int(np.shape(node["a"])[0]), int(np.shape(node["b"])[-1]))
  return out


def ensure_bank(inst, paths, slots: int, max_rank: int) -> None:
  """A local instance's bank covers `paths` with `slots` x `max_rank` (zeros where new).

  Banks only grow: a projection no adapter targets costs nothing, and a new kind of target
  (the first adapter on mlp/down, say) changes the bank's structure once (one recompile)."""
  bank = dict(inst.lora_bank or {})
  missing = [p for p in sorted(paths) if p not in bank]
  if not missing:
    return
  shapes = projections(inst.params)
  for path in missing:
    d_in, d_out = shapes[path]
    # Factors sharded like their base kernel: a row-parallel kernel's input dim is split, so
    # is a's; a column-parallel kernel's output dim is split, so is b's.
    node = inst.params
    for p in path.split("/"):
      node = node[p]
    spec = tuple(getattr(node["kernel"].sharding, "spec", ())) + (None, None)
    a_spec = NamedSharding(inst.mesh, P(None, None, spec[0]))
    b_spec = NamedSharding(inst.mesh, P(None, None, spec[1]))
    bank[path] = {
        "a": jax.device_put(np.zeros((slots, max_rank, d_in), inst.dtype), a_spec),
        "b": jax.device_put(np.zeros((slots, max_rank, d_out), inst.dtype), b_spec)}
  inst.lora_bank = bank
  inst.lora_bank_bytes = delta_bank.bank_bytes(bank)


def write_slot(inst, slot: int, factors: dict[str, dict[str, Any]], in_place: bool = False) -> None:
  """Slot `slot` of a local instance's bank := factors (path -> a [R, in], b [R, out]); banked
  paths not in `factors` are zeroed. Dispatches only: JAX orders it after the batches already
  reading the bank and before later ones. `in_place`: donate the old bank (the caller holds the
  lock under which batches read `inst.lora_bank`, so no one holds the old arrays)."""
  factors = {p: f for p, f in factors.items() if p in inst.lora_bank}
  write = _write_in_place if in_place else _write_copy
  inst.lora_bank = write(inst.lora_bank, np.int32(slot), factors)


class AdapterBanks:
  """Slot manager over the banks of every instance adapters touch (used under the engine lock)."""

  def __init__(self, slots: int, max_rank: int, dispatch_lock: Any = None):
    """`dispatch_lock`: the lock local dispatches (which read the banks) take; with it, slot
    writes go in place (without it, each write makes a new bank)."""
    if slots < 1 or max_rank < 1:
      raise ValueError("lora_slots and lora_max_rank must be >= 1")
    self.slots = slots
    self.max_rank = max_rank
    self._host: dict[str, dict[str, dict[str, dict[str, np.ndarray]]]] = {}  # model -> key -> path -> a/b
    self._host_bytes: dict[str, int] = {}
    self._instances: dict[str, Any] = {}  # banked instance key -> instance
    self._slot_of: dict[str, int] = {}  # resident adapter -> slot
    self._owner: list[str | None] = [None] * slots
    self._dirty: set[tuple[str, int]] = set()  # (instance key, slot) holding non-zero factors
    self._pins: collections.Counter = collections.Counter()
    self._lru: collections.OrderedDict = collections.OrderedDict()  # resident, unpinned
    self._rank: dict[str, int] = {}  # adapter -> its largest rank (columns it uses per slot)
    self._slot_rank = [0] * slots
    self.buckets = column_buckets(slots, max_rank)
    # Device copies of adapters' factors, made outside the engine lock: model -> key -> path -> a/b.
    self._staged: collections.OrderedDict = collections.OrderedDict()
    self._stage_lock = threading.Lock()
    self.dispatch_lock = dispatch_lock
    self.hits = self.misses = self.evictions = self.staged_installs = 0
    self.swap_s = self.stage_s = 0.0

  # ---- registration -----------------------------------------------------------------------

  def is_adapter(self, model: str) -> bool:
    return model in self._host

  def register(self, model: str, deltas: list[tuple[Any, Block]]) -> None:
    """Keeps the model's deltas in host memory (LoRA factors padded and scaled; compressed
    full-fine-tune deltas as stored) and banks its instances."""
    host, nbytes = {}, 0
    for inst, delta in deltas:
      if delta.kind == QDELTA:
        factors = full_delta.bank_factors(delta)
        if not _remote(inst):  # a worker checks them against its own copy of the block
          delta_bank.check_shapes(inst, factors, model)
        host[inst.key] = factors
        nbytes += delta_bank.factor_bytes(factors)
        continue
      factors, n = self._lora_factors(model, inst, delta)
      host[inst.key] = factors
      nbytes += n
    for inst, delta in deltas:
      if delta.kind == QDELTA:
        self._instances[inst.key] = inst
        if _remote(inst):
          inst.ensure_delta_bank(self.slots, host[inst.key])
        else:
          delta_bank.ensure_delta_bank(inst, host[inst.key], self.slots)
      else:
        self._ensure_bank(inst, delta.config["ranks"])
    self._host[model] = host
    self._host_bytes[model] = nbytes
    self._rank[model] = max((r for _, d in deltas if d.kind != QDELTA
                             for r in d.config["ranks"].values()), default=0)

  def _lora_factors(self, model: str, inst, delta: Block) -> tuple[dict[str, Any], int]:
    """A LoRA delta block's factors, zero-padded to the bank's rank and scaled; their bytes."""
    shapes = _delta_shapes(delta) if _remote(inst) else projections(inst.params)
    ranks, scaling = delta.config["ranks"], delta.config["scaling"]
    factors, nbytes = {}, 0
    for path, rank in ranks.items():
      if path not in shapes:
        raise JBlockError(f"adapter {model!r}: base block {inst.block_id[:12]} has no "
                          f"projection {path}")
      if rank > self.max_rank:
        raise InvalidRequestError("model", f"adapter {model!r} has rank {rank} at {path}, "
                                  f"more than the engine's lora_max_rank={self.max_rank}")
      d_in, d_out = shapes[path]
      node = delta.params
      for p in path.split("/"):
        node = node[p]
      a = np.zeros((self.max_rank, d_in), np.float32)  # A transposed: a bank column is a row
      b = np.zeros((self.max_rank, d_out), np.float32)
      a[:rank] = np.asarray(node["a"], np.float32).T
      b[:rank] = np.asarray(node["b"], np.float32) * np.float32(scaling[path])
      factors[path] = {"a": a, "b": b}
      nbytes += int(np.asarray(node["a"]).nbytes + np.asarray(node["b"]).nbytes)
    return factors, nbytes

  def unregister(self, model: str) -> None:
    """Forgets the adapter and frees (zeroes) its slot."""
    if model not in self._host:
      return
    slot = self._slot_of.pop(model, None)
    if slot is not None:
      self._owner[slot] = None
      self._lru.pop(model, None)
      self._write(slot, None)
    del self._host[model]
    del self._host_bytes[model]
    self._rank.pop(model, None)
    self._pins.pop(model, None)
    with self._stage_lock:
      self._staged.pop(model, None)

  def _ensure_bank(self, inst, paths) -> None:
    """The instance's bank covers `paths` (projections some registered adapter targets)."""
    self._instances[inst.key] = inst
    if _remote(inst):
      inst.ensure_lora_bank(self.slots, self.max_rank, paths)  # its worker builds or grows it
    else:
      ensure_bank(inst, paths, self.slots, self.max_rank)

  def drop_instance(self, key: str) -> None:
    self._instances.pop(key, None)
    self._dirty = {d for d in self._dirty if d[0] != key}

  # ---- slots --------------------------------------------------------------------------------

  def can_acquire(self, model: str) -> bool:
    if model not in self._host or model in self._slot_of:
      return True
    return None in self._owner or bool(self._lru)

  def acquire(self, model: str) -> int:
    """The adapter's slot, pinned (-1 for a model that is no adapter)."""
    if model not in self._host:
      return -1
    slot = self._slot_of.get(model)
    if slot is not None:
      self.hits += 1
    else:
      self.misses += 1
      if None in self._owner:
        slot = self._owner.index(None)
      elif self._lru:
        victim, _ = self._lru.popitem(last=False)
        slot = self._slot_of.pop(victim)
        self.evictions += 1
      else:
        raise JBlockError("every adapter bank slot is held by running requests")
      t0 = time.perf_counter()
      self._write(slot, model)
      self.swap_s += time.perf_counter() - t0
      self._slot_rank[slot] = self._rank[model]
      self._owner[slot] = model
      self._slot_of[model] = slot
    self._pins[model] += 1
    self._lru.pop(model, None)
    return slot

  def release(self, model: str) -> None:
    if model not in self._pins:
      return
    self._pins[model] -= 1
    if self._pins[model] <= 0:
      del self._pins[model]
      if model in self._slot_of:
        self._lru[model] = None

  def stage(self, model: str) -> None:
    """Copies the adapter's factors to the devices of its banks (call without the engine lock:
    this is the host->device transfer of a swap). A no-op for other models or when staged."""
    host = self._host.get(model)
    with self._stage_lock:
      if host is None or self._staged.get(model, (None,))[0] is host:
        if host is not None:
          self._staged.move_to_end(model)
        return
    t0 = time.perf_counter()
    staged = {}
    for key, factors in host.items():
      inst = self._instances.get(key)
      if inst is None:
        continue
      if _remote(inst):  # sent over the wire at install: nothing to copy to a device here
        staged[key] = factors
        continue
      bank = inst.lora_bank or {}
      # One slot of each bank array, sharded as the array is past its slot dim.
      staged[key] = {path: jax.tree.map(
          lambda f, arr: jax.device_put(np.asarray(f).astype(arr.dtype),
                                        NamedSharding(inst.mesh, P(*_spec(arr)[1:]))),
          f, {k: bank[path][k] for k in f}) for path, f in factors.items()}
    jax.block_until_ready(staged)
    with self._stage_lock:
      self._staged[model] = (host, staged)  # host: an adapter unloaded and loaded again re-stages
      while len(self._staged) > 2 * self.slots:  # bounded: device memory
        self._staged.popitem(last=False)
      self.stage_s += time.perf_counter() - t0

  def _write(self, slot: int, model: str | None) -> None:
    """Slot `slot` of every banked instance := the model's factors (zeros where it has none).

    Dispatches only (JAX orders it before any later batch that reads the bank); the factors come
    from `stage`, staged now if the caller did not."""
    factors_of = {}
    if model:
      host = self._host[model]
      with self._stage_lock:
        staged = self._staged.get(model, (None, None))
      if staged[0] is not host:  # not staged by the caller (or staged for an older load)
        self.stage(model)
        with self._stage_lock:
          staged = self._staged[model]
      else:
        self.staged_installs += 1
      factors_of = staged[1]
    for key, inst in self._instances.items():
      factors = factors_of.get(key)
      if factors is None and (key, slot) not in self._dirty:
        continue
      if factors is None:
        self._dirty.discard((key, slot))
        factors = {}
      else:
        self._dirty.add((key, slot))
      if _remote(inst):
        inst.install_adapter(slot, factors)
      elif self.dispatch_lock is not None:
        with self.dispatch_lock:
          write_slot(inst, slot, factors, in_place=True)
      else:
        write_slot(inst, slot, factors)

  def bucket_for(self, n: int) -> int:
    """The compiled column-list size that holds n columns."""
    return self.buckets[min(bisect.bisect_left(self.buckets, n), len(self.buckets) - 1)]

  def columns(self, row_slots) -> np.ndarray:
    """The bank columns a batch with these row slots uses (slot * R + j for j < the slot's
    adapter rank), padded with -1 to the next column bucket."""
    cols = [s * self.max_rank + j for s in sorted({int(x) for x in row_slots if x >= 0})
            for j in range(self._slot_rank[s])]
    out = np.full(self.bucket_for(len(cols)), -1, np.int32)
    out[:len(cols)] = cols
    return out

  def stats(self) -> dict[str, Any]:
    return {
        "slots": self.slots, "max_rank": self.max_rank,
        "registered": sorted(self._host), "resident": {m: s for m, s in sorted(self._slot_of.items())},
        "pinned": dict(self._pins), "hits": self.hits, "misses": self.misses,
        "evictions": self.evictions, "swap_s": round(self.swap_s, 6),
        "stage_s": round(self.stage_s, 6), "staged_installs": self.staged_installs,
        "host_bytes": sum(self._host_bytes.values()),
        "adapter_bytes": dict(self._host_bytes),
        "bank_bytes": sum(i.lora_bank_bytes for i in self._instances.values()),
    }
