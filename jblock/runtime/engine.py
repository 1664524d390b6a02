"""The block engine: continuous batching at block granularity across tenants.

Three parts, queues all the way down (vLLM v1's split):
- the `Scheduler` (jblock.runtime.scheduler) plans: admission, KV leases, which segment runs
  which rows next, and routing of results;
- `Executors` (jblock.runtime.executor) run: one per placement (the local mesh, each worker),
  fed with batches, never waited on by the scheduler;
- this engine glues them: one loop thread that takes finished batches back from the executors,
  asks the scheduler for the next ones and hands them out, all under one lock that the
  scheduler alone needs (no device work ever happens under it).

Requests of different models meet in the instances they share; consecutive instances always
traversed together run as one fused call (jblock.runtime.segments).
"""

import collections
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS, Block, flat_leaves
from jblock.errors import InstanceLostError, InvalidRequestError, NotFoundError, UnavailableError
from jblock.models import rope as rope_lib
from jblock.runtime import mesh as mesh_lib
from jblock.runtime.engine_api import ModelInfo, RequestHandle, SamplingParams, validate_request
from jblock.runtime.executor import (LocalExecutor, ThreadExecutor, run_local_segment,
                                     start_thread)
from jblock.runtime.instance import LocalBlockInstance
from jblock.runtime.kv import pages_for
from jblock.runtime import parts as parts_lib
from jblock.runtime import replay
from jblock.runtime import replicas as replicas_lib
from jblock.runtime.reroute import RerouteConfig
from jblock.runtime.rerouter import Rerouter
from jblock.runtime.lora import AdapterBanks
from jblock.runtime.scheduler import Request, Scheduler, SchedulerConfig
from jblock.runtime.segments import Segment, plan_segments
from jblock.runtime.step import BlockBatch, StepMeta
from jblock.zoo import records
from jblock.zoo.loading import ModelSpec, load_on_devices, spec_from_zoo


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  batch_size: int = 8  # default max step items per block batch
  batch_size_by_kind: tuple[tuple[str, int], ...] = ()  # per-kind override, e.g. (("head", 16),)
  batch_size_by_block: tuple[tuple[str, int], ...] = ()  # per-block-id override (id or id prefix)
  kv_slots: int = 16  # concurrent requests per layers instance (KV leases)
  kv_slots_by_block: tuple[tuple[str, int], ...] = ()  # per-block-id override (id or id prefix)
  kv_pages: int = 0  # KV pages per layers instance; 0 = kv_slots full-length requests' worth
  page_size: int = 16  # tokens per KV page
  max_seq_len: int = 256  # longest request: prompt + generated tokens
  prefill_chunk: int = 64  # longest prompt piece one step item carries
  length_buckets: tuple[int, ...] = (16, 64)  # padded prefill lengths (decode is length 1)
  max_waiting: int = 256  # admission queue bound; beyond it submit raises OverloadedError
  max_waiting_per_model: int = 0  # per-model admission bound (0 = max_waiting)
  fuse_segments: bool = True  # run consecutive blocks always traversed together as one call
  fuse_through_shared: bool = False  # fuse each model's local chain even through shared blocks (batches per model)
  max_in_flight_per_segment: int = 1  # batches of one segment on the device at once
  warmup: bool = True  # compile every decode bucket (and the prefill buckets) at start-up
  compilation_cache_dir: str | None = None  # persistent XLA compilation cache
  trace_size: int = 2000  # batches kept for the trace view
  lora_slots: int = 4  # LoRA adapters resident at once (bank slots per base layers block)
  lora_max_rank: int = 16  # bank factors are padded to this rank; larger adapters are refused
  reroute: RerouteConfig = RerouteConfig()  # steps onto equivalent blocks under load
  enable_prefix_caching: bool = True  # reuse computed prefixes' KV, across models that share blocks

  def kv_slots_for(self, block_id: str) -> int:
    for prefix, slots in self.kv_slots_by_block:
      if block_id.startswith(prefix):
        return slots
    return self.kv_slots

  def kv_pages_for(self, block_id: str) -> int:
    return self.kv_pages or self.kv_slots_for(block_id) * self.max_pages

  @property
  def max_pages(self) -> int:
    return pages_for(self.max_seq_len, self.page_size)

  def batch_size_for(self, block_id: str, kind: str) -> int:
    for prefix, size in self.batch_size_by_block:
      if block_id.startswith(prefix):
        return size
    return dict(self.batch_size_by_kind).get(kind, self.batch_size)

  def scheduler_config(self) -> SchedulerConfig:
    return SchedulerConfig(
        prefill_chunk=self.prefill_chunk, prefill_buckets=tuple(self.prefill_buckets()),
        max_waiting=self.max_waiting, max_waiting_per_model=self.max_waiting_per_model,
        max_in_flight_per_segment=self.max_in_flight_per_segment, page_size=self.page_size,
        max_pages=self.max_pages, prefix_caching=self.enable_prefix_caching)

  def batch_buckets(self, batch_size: int) -> list[int]:
    return self.scheduler_config().batch_buckets(batch_size)

  def prefill_buckets(self) -> list[int]:
    return sorted({min(b, self.prefill_chunk) for b in self.length_buckets} | {self.prefill_chunk})


# (key, block, block_id, batch_size, tied embedding table or None) -> a block instance.
InstanceFactory = Callable[[str, Block, str, int, Any], Any]


class Engine:
  """Serves many models at once; `sharing=False` is the per-model baseline on the same machinery."""

  def __init__(self, models: Sequence[ModelSpec], sharing: bool = True,
               mesh_shape: Sequence[int] | None = None, config: EngineConfig | None = None,
               zoo=None, instance_factory: InstanceFactory | None = None,
               executor_factory: Callable[[Any, Callable], Any] | None = None):
    self.config = config or EngineConfig()
    self.sharing = sharing
    self.mesh = mesh_lib.make_mesh(mesh_shape)
    self.zoo = zoo
    self._device_parts = parts_lib.DevicePartPool(zoo, self.mesh)  # experts loaded once
    self._new_instance = instance_factory or self._local_instance
    if self.config.compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", self.config.compilation_cache_dir)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    self._lock = threading.Condition()
    self._scheduler = Scheduler(self.config.scheduler_config())
    self._adapters = AdapterBanks(self.config.lora_slots, self.config.lora_max_rank)
    self._warmed_banks: set = set()  # (segment key, bank paths) whose column buckets are compiled
    self._scheduler.adapters = self._adapters
    self._instances: dict[str, Any] = {}
    self._models: dict[str, tuple[ModelSpec, list[Any]]] = {}
    self._segments: dict[str, list[Segment]] = {}
    self._draining: set[str] = set()
    self._requests: dict[str, Request] = {}  # request id -> live request
    self._done: collections.deque = collections.deque()  # (batch, output, error) from executors
    self._trace: collections.deque = collections.deque(maxlen=self.config.trace_size)
    self._dispatched: dict[int, float] = {}
    self._request_ids = itertools.count()
    self._local = LocalExecutor(self._batch_done)
    self._adapters.dispatch_lock = self._local.dispatch_lock  # bank slot writes go in place
    self._executors: dict[str, Any] = {"local": self._local}
    self._executor_factory = executor_factory
    self.cluster_stats: Callable[[], Any] | None = None  # the workers' view, when there are any
    # Rerouting onto equivalent blocks (jblock.runtime.reroute) and binding requests to block
    # replicas (jblock.runtime.replicas): only between shared instances.
    self._replicas = replicas_lib.Replicas()
    self._rerouter = Rerouter(self.config.reroute, self._scheduler, self._instances,
                              lambda m: (self._models[m][0].block_ids, self._models[m][1]),
                              lambda m: self._segments[m], self._local.dispatch_lock,
                              lambda: [s for segs in self._segments.values() for s in segs],
                              self._replicas)
    if sharing:
      self._scheduler.router = self._rerouter
    self._recoveries: collections.deque = collections.deque(maxlen=32)  # latest placement losses
    self._closed = False
    for spec in models:
      self._add_model(spec)
    self._thread = start_thread(self._loop, "jblock-engine")

  @classmethod
  def from_zoo(cls, zoo_dir: str, models: Sequence[str], sharing: bool = True,
               mesh_shape: Sequence[int] | None = None, config: EngineConfig | None = None) -> "Engine":
    from jblock.zoo.store import Zoo
    zoo = Zoo(zoo_dir)
    blocks: dict[str, Block] = {}
    # Only kinds and configs here: each instance restores its params straight onto devices.
    specs = [spec_from_zoo(zoo, name, blocks, load_params=False) for name in models]
    return cls(specs, sharing=sharing, mesh_shape=mesh_shape, config=config, zoo=zoo)

  # ---- model management -------------------------------------------------------------------

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

  def _add_model(self, spec: ModelSpec) -> ModelInfo:
    """Builds (and warms) the instances the model lacks without holding the lock, so serving
    goes on during a LoadModel; then registers them and the model at once."""
    chain = []
    table = None
    for block, block_id in zip(spec.chain, spec.block_ids):
      key = block_id if self.sharing else f"{spec.name}/{block_id}"
      with self._lock:
        inst = self._instances.get(key) or next((i for i in chain if i.key == key), None)
      if inst is None:
        inst = self._new_instance(key, block, block_id,
                                  self.config.batch_size_for(block_id, block.kind), table)
      if block.kind == EMBED:
        table = getattr(inst, "embed_table", None)
      chain.append(inst)
    deltas = self._delta_blocks(spec)  # host reads outside the lock
    equivalences = (records.read_all(self.zoo.root, spec.name)
                    if getattr(self.zoo, "root", None) and self.sharing else [])
    with self._lock:
      for i, inst in enumerate(chain):
        if inst.key not in self._instances:
          self._instances[inst.key] = inst
        chain[i] = self._instances[inst.key]  # a concurrent load may have registered it first
      if deltas:
        try:
          self._adapters.register(spec.name, [(chain[p], d) for p, d in deltas])
        except Exception:
          for inst in chain:
            if not inst.models:
              self._instances.pop(inst.key, None)
          raise
      for inst in chain:
        inst.models.add(spec.name)
      # The instances hold the params on their devices; the engine keeps no host copy.
      stripped = [Block(b.kind, b.config, {}) for b in spec.chain]
      self._models[spec.name] = (dataclasses.replace(spec, chain=stripped), chain)
      self._rerouter.set_records(spec.name, spec.block_ids, equivalences)
      self._replan()
      segments = self._segments[spec.name]
    if self.config.warmup:
      for seg in segments:
        if seg.local:
          self._warm(seg)
    with self._lock:
      return self._info(spec)

  def _delta_blocks(self, spec: ModelSpec) -> list[tuple[int, Block]]:
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

  def _replan(self) -> None:
    """Re-cuts every chain into segments (new requests use them; running ones keep theirs)."""
    self._segments = plan_segments({n: c for n, (_, c) in self._models.items()},
                                   fuse=self.config.fuse_segments,
                                   through_shared=self.config.fuse_through_shared)

  def _warm(self, seg: Segment) -> None:
    """Compiles the segment's decode buckets (every batch and page-table width) and its
    prefill buckets, with every write disabled (n_valid = 0)."""
    cfg = self._scheduler.config
    hidden = seg.instances[0].config.get("hidden_size")
    dtype = seg.instances[0].dtype
    shapes = [(b, 1, w) for b in cfg.batch_buckets(seg.batch_size) for w in cfg.width_buckets()]
    shapes += [(b, t, pages_for(t, cfg.page_size)) for b in cfg.batch_buckets(seg.batch_size)
               for t in cfg.prefill_buckets]
    # A segment with LoRA banks runs its one-token batches with a bank-column list of one of a few
    # sizes (each compiled); prompt chunks run without one.
    banks = tuple(tuple(sorted(getattr(i, "lora_bank", None) or ())) for i in seg.layers)
    cols = [None]
    if any(banks):
      if (seg.key, banks) in self._warmed_banks:
        return  # another adapter of this base already compiled these shapes
      self._warmed_banks.add((seg.key, banks))
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
      x = (np.zeros((b, t), np.int32) if seg.starts_at_embed
           else jax.numpy.zeros((b, t, hidden), dtype))
      ints, floats = meta.pack()
      with self._local.dispatch_lock:  # serving may dispatch to the same KV buffers meanwhile
        y = run_local_segment(seg, x, ints, floats, c)
      jax.block_until_ready(y)

  def _info(self, spec: ModelSpec) -> ModelInfo:
    c = spec.config
    return ModelInfo(name=spec.name, family=c.family, vocab_size=c.vocab_size,
                     max_seq_len=min(c.max_position_embeddings, self.config.max_seq_len),
                     chain=tuple(spec.block_ids), tokenizer_dir=spec.tokenizer_dir,
                     eos_token_ids=tuple(c.eos_token_ids), base_model=spec.base_model)

  def list_models(self) -> list[ModelInfo]:
    with self._lock:
      return [self._info(spec) for name, (spec, _) in sorted(self._models.items())
              if name not in self._draining]

  def model_info(self, name: str) -> ModelInfo:
    with self._lock:
      if name not in self._models or name in self._draining:
        raise NotFoundError(f"model {name!r} is not loaded")
      return self._info(self._models[name][0])

  def load_model(self, name: str) -> ModelInfo:
    if self.zoo is None:
      raise NotFoundError("this engine has no zoo to load models from")
    with self._lock:
      if name in self._models:
        return self._info(self._models[name][0])
    return self._add_model(spec_from_zoo(self.zoo, name, {}, load_params=False))

  def unload_model(self, name: str, timeout: float = 60.0) -> None:
    """Stops admitting `name`, waits for its in-flight requests, frees blocks no one else uses."""
    with self._lock:
      if name not in self._models:
        raise NotFoundError(f"model {name!r} is not loaded")
      self._draining.add(name)
      deadline = time.monotonic() + timeout
      while any(r.model == name for r in self._requests.values()):
        if not self._lock.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic()))):
          if time.monotonic() >= deadline:
            self._draining.discard(name)
            raise UnavailableError(f"model {name!r} did not drain within {timeout}s")
      _, chain = self._models.pop(name)
      self._draining.discard(name)
      self._adapters.unregister(name)
      for inst in chain:
        inst.models.discard(name)
        if not inst.models and inst.key in self._instances:
          for key in self._replicas.of(inst.key):  # its copies share its (now empty) model set
            self._replicas.remove(key)
            getattr(self._instances.pop(key), "close", lambda: None)()
          del self._instances[inst.key]
          self._adapters.drop_instance(inst.key)
          close = getattr(inst, "close", None)
          if close is not None:
            close()
      self._segments.pop(name, None)
      self._rerouter.drop_model(name)
      self._replan()

  def set_equivalences(self, model: str, recs) -> int:
    """Replaces the equivalence records (jblock.zoo.records) the model's rerouting uses (read
    from the zoo when the model is added); returns how many substitution sets they measure."""
    with self._lock:
      if model not in self._models:
        raise NotFoundError(f"model {model!r} is not loaded")
      return self._rerouter.set_records(model, self._models[model][0].block_ids, recs)

  def reroute_events(self) -> list[dict[str, Any]]:
    """The latest route changes: request, tenant, budget, route, its measured cost, KV handling."""
    with self._lock:
      return list(self._rerouter.events)

  # ---- requests -----------------------------------------------------------------------------

  def submit(self, model: str, prompt_tokens, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_token_ids=(),
             request_id: str | None = None, tenant: str | None = None,
             accuracy_budget: float | None = None) -> RequestHandle:
    """accuracy_budget: the top-1 disagreement the tenant accepts when its steps are rerouted
    onto equivalent blocks (jblock.runtime.reroute); None = the engine's default."""
    if accuracy_budget is not None and not 0.0 <= accuracy_budget <= 1.0:
      raise InvalidRequestError("accuracy_budget", f"must be in [0, 1], got {accuracy_budget}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_token_ids=tuple(stop_token_ids))
    self._adapters.stage(model)  # an adapter's host->device copy, before the lock (no-op else)
    with self._lock:
      if self._closed:
        raise UnavailableError("engine is shut down")
      if model in self._draining:
        raise UnavailableError(f"model {model!r} is being unloaded")
      if model not in self._models:
        raise NotFoundError(f"model {model!r} is not loaded")
      spec, chain = self._models[model]
      lost = next((i.lost_reason for i in chain if getattr(i, "lost_reason", "")), None)
      if lost:
        raise UnavailableError(f"model {model!r} cannot run: block {lost}")
      validate_request(self._info(spec), prompt_tokens, params)
      prompt = [int(t) for t in prompt_tokens]
      rid = request_id or f"req-{next(self._request_ids)}"
      handle = RequestHandle(rid, model, len(prompt), params, on_cancel=self._cancel)
      stop = frozenset(params.stop_token_ids) | frozenset(spec.config.eos_token_ids)
      req = self._scheduler.add(handle, model, tenant or "", prompt, params,
                                self._segments[model], stop,
                                kv_salt=",".join(d or "" for d in spec.delta_ids or ()),
                                recompute_at=_recompute_length(spec))
      req.accuracy_budget = accuracy_budget
      self._requests[rid] = req
      handle._engine_request = req
      self._scheduler.admit()  # leases its KV now if it fits: no wait for the loop
      self._deliver(self._scheduler.take_outputs())
    return handle

  def _cancel(self, handle: RequestHandle) -> None:
    """A cancelled request leaves its queue and frees its KV at once (not at its turn)."""
    with self._lock:
      req = getattr(handle, "_engine_request", None)
      if req is not None:
        self._scheduler.cancel(req)
      self._deliver(self._scheduler.take_outputs())

  def _deliver(self, outputs) -> None:
    """Hands the scheduler's outputs (jblock.runtime.scheduler.RequestOutput) to the request
    handles, in order; under the lock, so a request's tokens never arrive out of order."""
    for out in outputs:
      if out.finish is None:
        out.handle._emit(out.token)
      else:
        out.handle._finish(out.finish, out.error)
        self._requests.pop(out.handle.request_id, None)
    self._lock.notify_all()

  def generate(self, model: str, prompt_tokens, **kwargs) -> list[int]:
    return self.submit(model, prompt_tokens, **kwargs).result()

  # ---- the loop -----------------------------------------------------------------------------

  def _executor_for(self, seg: Segment):
    inst = seg.instances[0]
    place = "local" if seg.local else getattr(inst, "executor_key", inst.placement)
    ex = self._executors.get(place)
    if ex is None:
      if self._executor_factory is not None:
        ex = self._executor_factory(inst, self._batch_done)
      else:
        ex = ThreadExecutor(place, lambda b: b.segment.instances[0].run_batch(b), self._batch_done)
      self._executors[place] = ex
    return ex

  def _batch_done(self, batch: BlockBatch, output, error) -> None:
    with self._lock:
      self._done.append((batch, output, error))
      self._lock.notify_all()

  def _loop(self) -> None:
    while True:
      with self._lock:
        while self._done:
          batch, output, error = self._done.popleft()
          self._record(batch, time.perf_counter())
          if isinstance(error, InstanceLostError):
            self.placement_lost(error.placement, str(error))  # its requests pause, not fail
          self._deliver(self._scheduler.complete(batch, output, error))
        if self._closed and not self._scheduler.has_work() and not self._dispatched:
          return
        self._rerouter.reroute_stalled()  # steps waiting behind an absent block move on
        batches = self._scheduler.schedule()
        self._deliver(self._scheduler.take_outputs())  # admission ends cancelled waiters
        if not batches:
          self._lock.wait(timeout=0.05)
          continue
        now = time.perf_counter()
        for b in batches:
          self._dispatched[b.seq] = now
      for b in batches:  # dispatch outside the lock: executors call back into _batch_done
        self._executor_for(b.segment).submit(b)

  # ---- failures -----------------------------------------------------------------------------

  def placement_lost(self, placement: str, reason: str) -> None:
    """The instances at `placement` (an executor key: a worker) lost their state. The requests
    through them pause; on another thread each instance is re-placed (`inst.recover`), then the
    requests replay their KV there and go on (jblock.runtime.replay). Requests through an
    instance that cannot be re-placed fail with UnavailableError naming why. A replica there,
    and every replica of a primary there, is dropped instead (its requests replay onto the
    primary, and its worker may take the primary). Idempotent."""
    with self._lock:
      if self._closed:
        return  # shutting down: the workers going quiet is expected
      lost = [i for i in self._instances.values() if hasattr(i, "recover")
              and getattr(i, "executor_key", None) == placement and i.available]
      copies = sorted({k for i in lost for k in self._replicas.of(i.key)} | {
          i.key for i in lost if i.key in self._replicas.of(replicas_lib.block_of(i.key))})
      for key in copies:
        self._instances[key].available = False
        self._replicas.draining.add(key)
      replay.pause_all(self._scheduler, set(copies))  # their in-flight results are stale now
      lost = [i for i in lost if i.key not in copies]

      def drop_copies():
        for key in copies:
          try:
            self.drop_replica(key, timeout=0.0)
          except NotFoundError:
            pass  # removed meanwhile (another loss, a re-plan)

      if lost:
        self._replace(lost, placement, reason, before=drop_copies)
      elif copies:
        start_thread(drop_copies, "jblock-drop-replicas")

  def relocate(self, keys, reason: str, to: str | None = None) -> threading.Thread | None:
    """Moves instances (by key) to another placement (`to` first, if given): a new copy is
    hosted there and the old one freed, while the requests through them pause and then replay
    their KV into the new copy. Returns the thread doing it (join it to wait)."""
    with self._lock:
      moving = [self._instances[k] for k in keys
                if hasattr(self._instances.get(k), "recover") and self._instances[k].available]
      return self._replace(moving, ",".join(sorted({i.executor_key for i in moving})), reason, to)

  def _replace(self, instances: list, placement: str, reason: str,
               to: str | None = None, before: Callable[[], None] = lambda: None
               ) -> threading.Thread | None:
    """Under the lock: pauses the requests through `instances` and starts re-placing them (after
    `before`, on the same thread)."""
    if not instances:
      return None
    for inst in instances:
      inst.available = False
    affected = replay.pause_all(self._scheduler, {i.key for i in instances})
    event = {"placement": placement, "reason": reason, "blocks": len(instances),
             "requests_paused": len(affected), "at": time.time()}
    self._recoveries.append(event)
    return start_thread(lambda: (before(), self._recover(instances, affected, reason, event, to)),
                        "jblock-recover")

  # ---- replicas (jblock.runtime.replicas) -----------------------------------------------------

  def add_replica(self, block_id: str, key: str | None = None) -> str:
    """Hosts another copy of a served block under `key` (`<block_id>#n`; the next free one if
    None) through the instance factory (a remote one places it on the worker its placer plans
    for that key); new requests are then balanced over the copies. Returns the key."""
    with self._lock:
      primary = self._instances.get(block_id)
      if not self.sharing or primary is None:
        raise NotFoundError(f"block {block_id[:12]} is not a shared block of this engine")
      key = key or replicas_lib.next_key(block_id, self._instances)
      if replicas_lib.block_of(key) != block_id or key == block_id or key in self._instances:
        raise InvalidRequestError("key", f"{key!r} is not a free replica key of {block_id[:12]}")
      spec, chain = next((s, c) for s, c in self._models.values() if primary in c)
      block = spec.chain[chain.index(primary)]
      if getattr(primary, "params", None):  # a local copy shares the primary's weight buffers
        block = Block(block.kind, block.config, primary.params)
      tied = block.kind == HEAD and block.config.get("tied_to")
      table = getattr(chain[0], "embed_table", None) if tied else None
    inst = self._new_instance(key, block, block_id, primary.batch_size, table)  # no lock: RPCs
    with self._lock:
      inst.models = primary.models  # the same set: unloading the models frees every copy
      self._instances[key] = inst
      self._replicas.add(block_id, key)
      self._lock.notify_all()
    return key

  def drop_replica(self, key: str, timeout: float = 30.0, move_s: float = 60.0) -> dict:
    """Removes a replica: no new request is bound to it, its requests finish there for up to
    `timeout` seconds, the rest move onto the primary with a KV replay (for up to `move_s` more
    while the primary's KV pool has no room), then it is unhosted (params and KV freed)."""
    with self._lock:
      if key not in self._replicas.of(replicas_lib.block_of(key)) or key in self._replicas.removing:
        raise NotFoundError(f"{key!r} is not a replica served by this engine (or is being removed)")
      self._replicas.removing.add(key)
      self._replicas.draining.add(key)
      sched, t0 = self._scheduler, time.monotonic()
      moved = 0

      def through():
        return [r for r in sched.active if replay.uses(r, {key})]

      while through() and time.monotonic() < t0 + timeout:
        self._lock.wait(timeout=0.05)
      while through() and time.monotonic() < t0 + timeout + move_s:
        for req in [r for r in through() if self._rerouter.can_unbind(r, {key})]:
          replay.pause(sched, req)
          moved += self._rerouter.unbind(req, {key})
          replay.resume(sched, req)  # its KV replayed on the primary (towards the same target)
        if through():
          self._lock.wait(timeout=0.05)
      for req in through():
        sched.finish(req, "error", UnavailableError(
            f"replica {key[:16]} was removed and its primary had no KV room for the request"))
      self._deliver(sched.take_outputs())
      while (any(n and key in k for k, n in sched.in_flight.items())  # stale batches come back
             and time.monotonic() < t0 + timeout + 2 * move_s):
        self._lock.wait(timeout=0.05)
      inst = self._instances.pop(key)
      self._replicas.remove(key)
      for k in [k for k in sched.segments if key in k]:  # no request runs through them now
        sched.segments.pop(k)
        sched.queues.pop(k, None)
      drained_s = time.monotonic() - t0
      self._lock.notify_all()
    getattr(inst, "close", lambda: None)()  # a remote copy: UnhostBlock on its worker
    return {"key": key, "requests_moved": moved, "drain_s": round(drained_s, 3)}

  def retry_lost(self) -> None:
    """Tries again to place the instances that found no worker (say, when a worker joins)."""
    with self._lock:
      lost = [i for i in self._instances.values() if getattr(i, "lost_reason", "")]
      for inst in lost:
        inst.lost_reason = ""
    if lost:
      start_thread(lambda: self._recover(lost, [], "re-placed when a worker joined"),
                   "jblock-recover")

  def _recover(self, lost: list, affected: list[Request], reason: str,
               event: dict | None = None, to: str | None = None) -> None:
    t0 = time.perf_counter()
    failed: dict[str, Exception] = {}
    for inst in lost:  # RPCs: outside the lock, serving goes on meanwhile
      try:
        inst.recover(reason, to) if to else inst.recover(reason)
      except Exception as e:
        failed[inst.key] = e
    with self._lock:
      for inst in lost:
        inst.available = inst.key not in failed
        if inst.pool is not None:
          inst.pool.drop_cache()  # re-hosted empty: its registered prefixes are gone
      doomed = [r for r in list(self._scheduler.active) if replay.uses(r, set(failed))]
      for req in doomed:
        if req not in affected:
          replay.pause(self._scheduler, req)
      for queue in self._scheduler.waiting.values():  # would wait for the lost block forever
        for req in [r for r in queue if replay.uses(r, set(failed))]:
          queue.remove(req)
          doomed.append(req)
      replayed = 0
      for req in set(affected) | set(doomed):
        bad = next((k for k in failed if replay.uses(req, {k})), None)
        if bad is not None:
          self._scheduler.finish(req, "error", UnavailableError(str(failed[bad])))
        elif not req.done and req.item is None:  # (a dropped replica's may be queued already)
          replayed += req.cached  # tokens whose KV the replay writes again
          replay.resume(self._scheduler, req)
      self._deliver(self._scheduler.take_outputs())
      if event is not None:
        event.update(rehost_s=round(time.perf_counter() - t0, 3), blocks_unplaced=len(failed),
                     requests_failed=sum(1 for r in set(affected) | set(doomed)
                                         if r.handle.finish_reason == "error"),
                     tokens_replayed=replayed)
      self._lock.notify_all()

  def _record(self, batch: BlockBatch, done_at: float) -> None:
    seg = batch.segment
    self._trace.append((batch.seq, "+".join(i.kind for i in seg.instances),
                        tuple(i.block_id[:12] for i in seg.instances), len(batch.items),
                        batch.b_pad, batch.t_pad, tuple(sorted({it.req.model for it in batch.items})),
                        self._dispatched.pop(batch.seq, done_at), done_at))

  # ---- views --------------------------------------------------------------------------------

  def stats(self) -> dict[str, Any]:
    with self._lock:
      blocks = [inst.stats() for inst in self._instances.values()]
      sched = self._scheduler
      return {
          "sharing": self.sharing,
          "mesh": dict(self.mesh.shape),
          "blocks": blocks,
          "resident_bytes": parts_lib.resident_bytes(self._instances.values()),
          "kv_bytes": sum(b["kv_bytes"] for b in blocks),
          "queue_depth": sched.num_waiting,
          "requests": {"waiting": sched.num_waiting, "active": len(sched.active),
                       "finished": dict(sched.finished)},
          "models": {name: [inst.key for inst in chain] for name, (_, chain) in self._models.items()},
          "segments": {name: [list(s.key) for s in segs] for name, segs in self._segments.items()},
          "adapters": self._adapters.stats(),
          "prefix_cache": _prefix_stats(sched, self._instances.values()),
          "reroute": self._rerouter.stats(),
          "workers": self.cluster_stats() if self.cluster_stats else [],
          "recoveries": [dict(e) for e in self._recoveries],
          "replicas": replicas_lib.stats(self._instances, self._replicas, self._rerouter.through()),
      }

  def trace(self) -> list[dict[str, Any]]:
    """The latest batches: which segment ran with which requests, dispatched and done times
    (time.perf_counter); two batches overlap when one was dispatched before the other was done."""
    fields = ("batch", "kind", "blocks", "items", "padded_batch", "length", "models",
              "dispatched", "done")
    with self._lock:
      return [dict(zip(fields, t)) for t in self._trace]

  def trace_text(self, last: int = 50) -> str:
    """Plain-text view of the latest batches: which block ran with which requests."""
    lines = [f"{'batch':>6} {'kind':<20} {'block':<16} {'items':>5}/{'pad':<3} {'len':>4} {'ms':>7}  models"]
    for t in self.trace()[-last:]:
      blocks = t["blocks"][0] + (f"+{len(t['blocks']) - 1}" if len(t["blocks"]) > 1 else "")
      kind = t["kind"] if len(t["kind"]) <= 20 else t["kind"][:17] + "..."
      lines.append(f"{t['batch']:>6} {kind:<20} {blocks:<16} {t['items']:>5}/{t['padded_batch']:<3} "
                   f"{t['length']:>4} {1e3 * (t['done'] - t['dispatched']):7.1f}  "
                   f"{','.join(t['models'])}")
    return "\n".join(lines)

  def close(self, drain_timeout: float = 0.0) -> None:
    """Stops admitting; in-flight requests get `drain_timeout` seconds to finish, the rest end
    with an error; then the loop and the executors stop."""
    with self._lock:
      self._closed = True
      deadline = time.monotonic() + drain_timeout
      while self._scheduler.has_work() and time.monotonic() < deadline:
        self._lock.wait(timeout=0.05)
      self._scheduler.drop_all(UnavailableError("engine closed before the request finished"))
      self._deliver(self._scheduler.take_outputs())
    self._thread.join(30.0)
    for ex in self._executors.values():
      ex.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _recompute_length(spec: ModelSpec) -> int:
  """The cached length at which the model's KV is computed again (0 = never), from its layers
  blocks' config: Phi-3 LongRoPE switches every position's frequencies past its original length
  (jblock.models.rope.rerun_length)."""
  return next((rope_lib.rerun_length(b.config.get("rope")) for b in spec.chain
               if b.kind == LAYERS), 0)


def _prefix_stats(scheduler, instances) -> dict[str, Any]:
  """Request-level prefix-cache figures and the pages every KV pool holds for it."""
  pools = [i.pool for i in instances if i.pool is not None]
  pages = collections.Counter()
  for pool in pools:
    pages.update(pool.cache_stats())
  return {**scheduler.prefix_stats(), **pages, "enabled": scheduler.config.prefix_caching,
          "computed_tokens": _computed(scheduler.computed)}


def _computed(counter) -> dict[str, dict[str, int]]:
  """Instance key -> {"prompt": tokens, "decode": tokens} it computed."""
  out: dict[str, dict[str, int]] = {}
  for (key, phase), n in counter.items():
    out.setdefault(key, {"prompt": 0, "decode": 0})[phase] = n
  return out
