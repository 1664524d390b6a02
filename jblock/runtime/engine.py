"""The block engine: continuous batching at block granularity across tenants.

A thin loop over parts with one job each (vLLM v1's split, queues all the way down):
- the `Scheduler` (jblock.runtime.scheduler) plans: admission, KV leases and prefix caching,
  which segment runs which rows next; it takes results back and returns outputs as data;
- `Executors` (jblock.runtime.executor) run: one per placement (the local mesh, each worker),
  fed with batches, never waited on by the scheduler;
- the `Registry` (jblock.runtime.registry) holds the models, their block instances and segments;
- `Recovery` (jblock.runtime.recovery) re-places instances and manages replicas;
- the `Rerouter` (jblock.runtime.rerouter) is the scheduler's routing policy.

One step: the loop takes finished batches back from the executors, hands them to the scheduler,
delivers the outputs it returns to the request handles, asks it for the next batches and
dispatches them outside the lock. No device work and no RPC happens under the lock.

Requests of different models meet in the instances they share; consecutive instances always
traversed together run as one fused call (jblock.runtime.segments).
"""

import collections
import itertools
import threading
import time
from typing import Any, Callable, Sequence

import jax

from jblock.blocks import LAYERS, Block
from jblock.errors import InstanceLostError, InvalidRequestError, NotFoundError, UnavailableError
from jblock.models import rope as rope_lib
from jblock.runtime import mesh as mesh_lib
from jblock.runtime import replicas as replicas_lib
from jblock.runtime import views
from jblock.runtime.engine_api import (ModelInfo, RequestHandle, TokenConstraint, sampling_params,
                                       validate_request)
from jblock.runtime.engine_config import EngineConfig, InstanceFactory
from jblock.runtime.executor import LocalExecutor, ThreadExecutor, start_thread
from jblock.runtime.lora import AdapterBanks
from jblock.runtime.recovery import Recovery
from jblock.runtime.registry import Registry
from jblock.runtime.rerouter import Rerouter
from jblock.runtime.scheduler import Request, RequestOutput, Scheduler
from jblock.runtime.segments import Segment
from jblock.runtime.step import BlockBatch
from jblock.zoo import records
from jblock.zoo.loading import ModelSpec, spec_from_zoo

__all__ = ["Engine", "EngineConfig", "ModelSpec"]


class Engine:
  """Serves many models at once; `sharing=False` is the per-model baseline on the same machinery."""

  def __init__(self, models: Sequence[ModelSpec], sharing: bool = True,
               mesh_shape: Sequence[int] | None = None, config: EngineConfig | None = None,
               zoo=None, instance_factory: InstanceFactory | None = None,
               executor_factory: Callable[[Any, Callable], Any] | None = None,
               cluster_stats: Callable[[], Any] | None = None):
    """`cluster_stats`: the workers' view (membership), when the engine runs over workers."""
    self.config = config or EngineConfig()
    self.sharing = sharing
    self.mesh = mesh_lib.make_mesh(mesh_shape)
    self.zoo = zoo
    if self.config.compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", self.config.compilation_cache_dir)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    self._lock = threading.Condition()
    self._local = LocalExecutor(self._batch_done)
    self._executors: dict[str, Any] = {"local": self._local}
    self._executor_factory = executor_factory
    # Bank slot writes go in place, under the lock every dispatch that reads the banks takes.
    self._adapters = AdapterBanks(self.config.lora_slots, self.config.lora_max_rank,
                                  dispatch_lock=self._local.dispatch_lock)
    self._replicas = replicas_lib.Replicas()
    self._registry = Registry(self.config, sharing, self.mesh, zoo, self._lock, self._adapters,
                              self._replicas, self._local.dispatch_lock, instance_factory)
    # Rerouting onto equivalent blocks (jblock.runtime.reroute) and binding requests to block
    # replicas (jblock.runtime.replicas): the scheduler's routing policy. Without sharing it
    # never has records or replicas, so it never moves a request.
    self._scheduler = Scheduler(
        self.config.scheduler_config(), adapters=self._adapters,
        router=lambda scheduler: Rerouter(self.config.reroute, scheduler, self._registry,
                                          self._local.dispatch_lock, self._replicas))
    self._rerouter = self._scheduler.router
    # The registry's dicts, under the names the engine's tests and benches read.
    self._instances = self._registry.instances
    self._models = self._registry.models
    self._segments = self._registry.segments
    self._draining = self._registry.draining
    self._recovery = Recovery(self._lock, self._scheduler, self._registry, self._rerouter,
                              self._replicas, self._deliver, lambda: self._closed)
    self._requests: dict[RequestHandle, Request] = {}  # live requests
    self._done: collections.deque = collections.deque()  # (batch, output, error) from executors
    self._trace = views.Trace(self.config.trace_size)
    self._request_ids = itertools.count()
    self.cluster_stats = cluster_stats
    self._closed = False
    # Warmed once all are registered: each model may grow the banks its base's segments hold
    # (a new encoding, a new target), and a grown bank compiles every shape again.
    for spec in models:
      self._add_model(spec, warm=False)
    if self.config.warmup:
      for seg in {id(s): s for s in self._registry.all_segments()}.values():
        if seg.local:
          self._registry.warm(seg, self._scheduler.config)
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

  # ---- models -------------------------------------------------------------------------------

  def _add_model(self, spec: ModelSpec, warm: bool = True) -> ModelInfo:
    """Builds (and, with `warm`, warms) the instances the model lacks without holding the lock,
    so serving goes on during a LoadModel; then registers them and the model at once."""
    chain = self._registry.build_chain(spec)
    deltas = self._registry.delta_blocks(spec)  # host reads outside the lock
    root = self.zoo.root if self.zoo is not None else None
    equivalences = records.read_all(root, spec.name) if root and self.sharing else []
    with self._lock:
      segments = self._registry.register(spec, chain, deltas)
      self._rerouter.set_records(spec.name, spec.block_ids, equivalences)
    if warm and self.config.warmup:
      for seg in segments:
        if seg.local:
          self._registry.warm(seg, self._scheduler.config)
    with self._lock:
      return self._info(spec)

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
      closing = self._registry.remove(name)
      self._rerouter.drop_model(name)
    for inst in closing:  # outside the lock: a remote instance unhosts itself (an RPC)
      inst.close()

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

  def submit(self, model: str, prompt_tokens, *, request_id: str | None = None,
             tenant: str | None = None, accuracy_budget: float | None = None,
             constraint: TokenConstraint | None = None, **sampling) -> RequestHandle:
    """engine_api.Engine.submit. accuracy_budget: the top-1 disagreement the tenant accepts when
    its steps are rerouted onto equivalent blocks (jblock.runtime.reroute); None = the engine's
    default."""
    if accuracy_budget is not None and not 0.0 <= accuracy_budget <= 1.0:
      raise InvalidRequestError("accuracy_budget", f"must be in [0, 1], got {accuracy_budget}")
    params = sampling_params(**sampling)
    self._adapters.stage(model)  # an adapter's host->device copy, before the lock (no-op else)
    with self._lock:
      if self._closed:
        raise UnavailableError("engine is shut down")
      if model in self._draining:
        raise UnavailableError(f"model {model!r} is being unloaded")
      if model not in self._models:
        raise NotFoundError(f"model {model!r} is not loaded")
      spec, chain = self._models[model]
      lost = next((i.lost_reason for i in chain if i.lost_reason), None)
      if lost:
        raise UnavailableError(f"model {model!r} cannot run: block {lost}")
      validate_request(self._info(spec), prompt_tokens, params)
      prompt = [int(t) for t in prompt_tokens]
      rid = request_id or f"req-{next(self._request_ids)}"
      handle = RequestHandle(rid, model, len(prompt), params, on_cancel=self._cancel)
      eos = () if params.ignore_eos else spec.config.eos_token_ids
      stop = frozenset(params.stop_token_ids) | frozenset(eos)
      self._requests[handle] = self._scheduler.add(
          handle, model, tenant or "", prompt, params, self._segments[model], stop,
          kv_salt=",".join(d or "" for d in spec.delta_ids or ()),
          recompute_at=_recompute_length(spec), accuracy_budget=accuracy_budget,
          constraint=constraint)
      self._scheduler.admit()  # leases its KV now if it fits: no wait for the loop
      self._deliver(self._scheduler.take_outputs())
    return handle

  def _cancel(self, handle: RequestHandle) -> None:
    """A cancelled request leaves its queue and frees its KV at once (not at its turn)."""
    with self._lock:
      req = self._requests.get(handle)
      if req is not None:
        self._scheduler.cancel(req)
      self._deliver(self._scheduler.take_outputs())

  def _deliver(self, outputs: list[RequestOutput]) -> None:
    """Hands the scheduler's outputs to the request handles, in order; under the lock, so a
    request's tokens never arrive out of order."""
    for out in outputs:
      if out.prompt_logprobs:
        out.handle._add_prompt_logprobs(out.prompt_logprobs)
      if out.token is not None:
        out.handle._emit(out.token, out.logprobs)
      if out.finish is not None:
        out.handle._finish(out.finish, out.error)
        self._requests.pop(out.handle, None)
    self._lock.notify_all()

  def generate(self, model: str, prompt_tokens, **kwargs) -> list[int]:
    return self.submit(model, prompt_tokens, **kwargs).result()

  # ---- the loop -----------------------------------------------------------------------------

  def _executor_for(self, seg: Segment):
    inst = seg.instances[0]
    place = "local" if seg.local else inst.executor_key
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
          self._trace.done(batch, time.perf_counter())
          if isinstance(error, InstanceLostError):
            self.placement_lost(error.placement, str(error))  # its requests pause, not fail
          self._deliver(self._scheduler.complete(batch, output, error))
        if self._closed and not self._scheduler.has_work() and not self._trace.pending:
          return
        self._rerouter.reroute_stalled()  # steps waiting behind an absent block move on
        batches = self._scheduler.schedule()
        self._deliver(self._scheduler.take_outputs())  # admission ends cancelled waiters
        if not batches:
          self._lock.wait(timeout=0.05)
          continue
        now = time.perf_counter()
        for b in batches:
          self._trace.dispatched(b, now)
      for b in batches:  # dispatch outside the lock: executors call back into _batch_done
        self._executor_for(b.segment).submit(b)

  # ---- placements and replicas (jblock.runtime.recovery) -------------------------------------

  def placement_lost(self, placement: str, reason: str) -> None:
    self._recovery.placement_lost(placement, reason)

  def relocate(self, keys, reason: str, to: str | None = None) -> threading.Thread | None:
    return self._recovery.relocate(keys, reason, to)

  def add_replica(self, block_id: str, key: str | None = None) -> str:
    return self._recovery.add_replica(block_id, key)

  def drop_replica(self, key: str, timeout: float = 30.0, move_s: float = 60.0) -> dict:
    return self._recovery.drop_replica(key, timeout, move_s)

  def retry_lost(self) -> None:
    self._recovery.retry_lost()

  placement_lost.__doc__ = Recovery.placement_lost.__doc__
  relocate.__doc__ = Recovery.relocate.__doc__
  add_replica.__doc__ = Recovery.add_replica.__doc__
  drop_replica.__doc__ = Recovery.drop_replica.__doc__
  retry_lost.__doc__ = Recovery.retry_lost.__doc__

  # ---- views --------------------------------------------------------------------------------

  def stats(self) -> dict[str, Any]:
    with self._lock:
      return views.engine_stats(self.sharing, self.mesh, self._registry, self._scheduler,
                                self._adapters, self._rerouter, self._replicas,
                                self._recovery.events, self.cluster_stats)

  def admission_limit(self) -> int:
    """The admission queue (max_waiting) plus every layers block's KV slots (an upper bound on
    the requests running)."""
    running = sum(b["kv_slots_used"] + b["kv_slots_free"] for b in self.stats()["blocks"]
                  if b["kind"] == "layers")
    return self.config.max_waiting + (running or self.config.kv_slots)

  def trace(self) -> list[dict[str, Any]]:
    """The latest batches: which segment ran with which requests, dispatched and done times
    (time.perf_counter); two batches overlap when one was dispatched before the other was done."""
    with self._lock:
      return self._trace.rows()

  def trace_text(self, last: int = 50) -> str:
    """Plain-text view of the latest batches: which block ran with which requests."""
    return views.trace_text(self.trace()[-last:])

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
