"""The engine's registry: which models it serves, the block instances their chains run through,
and the segments those chains are cut into.

Instances are built (params restored from the zoo onto the mesh, or hosted on a worker by the
instance factory) without the engine lock, so serving goes on during a LoadModel; registering
them, and the re-cut of every chain into segments, happen at once under the lock. The registry
is also the chain catalog the rerouter reads (`chain_of`, `segments_of`, `all_segments`).
"""

import dataclasses
import itertools
import threading
from typing import Any

import jax
import numpy as np

from jblock.blocks import EMBED, LAYERS, Block, flat_leaves
from jblock.errors import NotFoundError
from jblock.runtime import mesh as mesh_lib
from jblock.runtime import parts as parts_lib
from jblock.runtime.engine_config import EngineConfig, InstanceFactory
from jblock.runtime.executor import run_local_segment
from jblock.runtime.instance import LocalBlockInstance
from jblock.runtime.kv import pages_for
from jblock.runtime.lora import AdapterBanks, has_lora
from jblock.runtime.replicas import Replicas
from jblock.runtime.scheduler import SchedulerConfig
from jblock.runtime.segments import Segment, plan_segments
from jblock.runtime.step import StepMeta
from jblock.zoo.loading import ModelSpec, load_on_devices


class Registry:
  """Models, instances and segments; every read and write under the engine's lock."""

  def __init__(self, config: EngineConfig, sharing: bool, mesh, zoo, lock: threading.Condition,
               adapters: AdapterBanks, replicas: Replicas, dispatch_lock,
               instance_factory: InstanceFactory | None = None):
    self.config = config
    self.sharing = sharing
    self.mesh = mesh
    self.zoo = zoo
    self._lock = lock
    self._adapters = adapters
    self._replicas = replicas
    self._dispatch_lock = dispatch_lock  # held while a warm-up call swaps the KV pools
    self.new_instance: InstanceFactory = instance_factory or self._local_instance
    self._device_parts = parts_lib.DevicePartPool(zoo, mesh)  # experts loaded once
    self._warmed_banks: set = set()  # (segment key, bank paths) whose column buckets are compiled
    self.instances: dict[str, Any] = {}
    self.models: dict[str, tuple[ModelSpec, list[Any]]] = {}
    self.segments: dict[str, list[Segment]] = {}
    self.draining: set[str] = set()

  # ---- the chain catalog (jblock.runtime.rerouter) -------------------------------------------

  def chain_of(self, model: str) -> tuple[list[str], list]:
    """The model's block ids and its own instances, in chain order."""
    spec, chain = self.models[model]
    return spec.block_ids, chain

  def segments_of(self, model: str) -> list[Segment]:
    return self.segments[model]

  def all_segments(self) -> list[Segment]:
    return [s for segs in self.segments.values() for s in segs]

  # ---- models in ------------------------------------------------------------------------------

  def _local_instance(self, key: str, block: Block, block_id: str, batch_size: int, table):
    cfg = self.config
    if not flat_leaves(block.params) and self.zoo is not None:
      # Expert-level parts once per engine (per instance without sharing: the baseline).
      pool = self._device_parts if self.sharing else parts_lib.DevicePartPool(self.zoo, self.mesh)
      block = pool.load_block(block_id) or load_on_devices(
          self.zoo, block_id, lambda shapes: mesh_lib.param_shardings(shapes, self.mesh))
    pages = cfg.kv_pages_for(block_id) if block.kind == LAYERS else 0
    return LocalBlockInstance(key, block, block_id, self.mesh, batch_size, num_pages=pages,
                              page_size=cfg.page_size, max_leases=cfg.kv_slots_for(block_id),
                              shared_table=table)

  def build_chain(self, spec: ModelSpec) -> list:
    """The model's instances: the registered ones it shares, new ones for the rest (built now,
    without the lock: params restored or hosted)."""
    chain = []
    table = None
    for block, block_id in zip(spec.chain, spec.block_ids):
      key = block_id if self.sharing else f"{spec.name}/{block_id}"
      with self._lock:
        inst = self.instances.get(key) or next((i for i in chain if i.key == key), None)
      if inst is None:
        inst = self.new_instance(key, block, block_id,
                                 self.config.batch_size_for(block_id, block.kind), table)
      if block.kind == EMBED:
        table = inst.embed_table
      chain.append(inst)
    return chain

  def delta_blocks(self, spec: ModelSpec) -> list[tuple[int, Block]]:
    """(chain position, delta block with params) of an adapter; [] for other models."""
    out = []
    for pos, delta in enumerate(spec.deltas or ()):
      if delta is None:
        continue
      if not flat_leaves(delta.params):
        if self.zoo is None:
          raise NotFoundError(f"model {spec.name!r}: delta block params missing and no zoo")
        delta = self.zoo.load_block(spec.delta_ids[pos])
      if delta.config.get("base") != spec.block_ids[pos]:
        raise NotFoundError(f"model {spec.name!r}: delta block at chain position {pos} is for "
                            f"block {str(delta.config.get('base'))[:12]}, the chain has "
                            f"{spec.block_ids[pos][:12]}")
      out.append((pos, delta))
    return out

  def register(self, spec: ModelSpec, chain: list, deltas: list[tuple[int, Block]]) -> list[Segment]:
    """Under the lock: the model, its instances (a concurrent load may have registered some
    first) and its adapter's deltas; every chain re-cut. Returns the model's segments."""
    for i, inst in enumerate(chain):
      if inst.key not in self.instances:
        self.instances[inst.key] = inst
      chain[i] = self.instances[inst.key]
    if deltas:
      try:
        self._adapters.register(spec.name, [(chain[p], d) for p, d in deltas])
      except Exception:
        for inst in chain:
          if not inst.models:
            self.instances.pop(inst.key, None)
        raise
    for inst in chain:
      inst.models.add(spec.name)
    # The instances hold the params on their devices; the engine keeps no host copy.
    stripped = [Block(b.kind, b.config, {}) for b in spec.chain]
    self.models[spec.name] = (dataclasses.replace(spec, chain=stripped), chain)
    self.replan()
    return self.segments[spec.name]

  def replan(self) -> None:
    """Re-cuts every chain into segments (new requests use them; running ones keep theirs)."""
    planned = plan_segments({n: c for n, (_, c) in self.models.items()},
                            fuse=self.config.fuse_segments,
                            through_shared=self.config.fuse_through_shared)
    self.segments.clear()
    self.segments.update(planned)

  # ---- models out -------------------------------------------------------------------------------

  def remove(self, name: str) -> list:
    """Under the lock, once the model has drained: forgets it and the instances (and their
    replicas) no other model uses. Returns those instances, for the caller to close outside
    the lock (a remote one unhosts itself on its worker)."""
    _, chain = self.models.pop(name)
    self.draining.discard(name)
    self._adapters.unregister(name)
    closing = []
    for inst in chain:
      inst.models.discard(name)
      if not inst.models and inst.key in self.instances:
        for key in self._replicas.of(inst.key):  # its copies share its (now empty) model set
          self._replicas.remove(key)
          closing.append(self.instances.pop(key))
        del self.instances[inst.key]
        self._adapters.drop_instance(inst.key)
        closing.append(inst)
    self.segments.pop(name, None)
    self.replan()
    return closing

  # ---- compiling ----------------------------------------------------------------------------------

  def warm(self, seg: Segment, cfg: SchedulerConfig) -> None:
    """Compiles the segment's decode buckets (every batch and page-table width) and its
    prefill buckets, with every write disabled (n_valid = 0)."""
    hidden = seg.instances[0].config.get("hidden_size")
    dtype = seg.instances[0].dtype
    shapes = [(b, 1, w) for b in cfg.batch_buckets(seg.batch_size) for w in cfg.width_buckets()]
    shapes += [(b, t, pages_for(t, cfg.page_size)) for b in cfg.batch_buckets(seg.batch_size)
               for t in cfg.prefill_buckets]
    # A segment with LoRA banks runs its one-token batches with a bank-column list of one of a few
    # sizes (each compiled); prompt chunks run without one.
    banks = tuple(tuple(sorted((p, tuple(sorted(e or ()))) for p, e in (i.lora_bank or {}).items()))
                  for i in seg.instances)
    cols = [None]
    if any(banks):
      if (seg.key, banks) in self._warmed_banks:
        return  # another adapter of this base already compiled these shapes
      self._warmed_banks.add((seg.key, banks))
      if any(has_lora(i.lora_bank) for i in seg.layers):
        cols = self._adapters.buckets
    for (b, t, w), c in itertools.product(shapes, cols):
      if t > 1 and c != cols[0]:
        continue  # prompt chunks run without a column list (the scheduler sends none): once
      c = None if t > 1 else c
      if c is not None and c > self._adapters.bucket_for(b * self._adapters.max_rank):
        continue  # b rows use at most b slots' columns: a bigger list never meets this batch size
      c = None if c is None else np.full(c, -1, np.int32)
      w = next(x for x in cfg.width_buckets() if x >= min(w, cfg.max_pages))
      meta = StepMeta.empty(b, len(seg.layers), w)
      # Hidden states arrive committed to the mesh (the previous segment's output): an
      # uncommitted array here would compile a different executable than serving then uses.
      x = (np.zeros((b, t), np.int32) if seg.starts_at_embed
           else jax.device_put(np.zeros((b, t, hidden), dtype), mesh_lib.replicated(self.mesh)))
      ints, floats = meta.pack()
      with self._dispatch_lock:  # serving may dispatch to the same KV buffers meanwhile
        y = run_local_segment(seg, x, ints, floats, c)
      jax.block_until_ready(y)

