"""The block engine: continuous batching at block granularity across tenants.

Queues all the way down: every request has at most one step item in flight (a prefill chunk
or a decode step); the item waits in the queue of the next block instance of its chain. The
scheduler thread runs the instance with the fullest (then oldest) queue, up to its batch size,
and routes each output onward. Requests of different models meet in the instances they share.
"""

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS, Block, flat_leaves
from jblock.errors import JBlockError, NotFoundError, OverloadedError, UnavailableError
from jblock.models.config import ModelConfig
from jblock.runtime import mesh as mesh_lib
from jblock.runtime.engine_api import ModelInfo, RequestHandle, SamplingParams, validate_request
from jblock.runtime.instance import BlockInstance

# A block instance is anything with BlockInstance's surface: key, block_id, kind, batch_size,
# models, slots, run(x, meta, sampling), stats() and, for embed, embed_table. Local instances
# run on this process's mesh; remote ones (jblock.serving.worker) on a worker over gRPC.


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  batch_size: int = 8  # default max step items per block batch
  batch_size_by_kind: tuple[tuple[str, int], ...] = ()  # per-kind override, e.g. (("head", 16),)
  batch_size_by_block: tuple[tuple[str, int], ...] = ()  # per-block-id override (id or id prefix)
  kv_slots: int = 16  # KV slots per layers instance (concurrent requests through it)
  kv_slots_by_block: tuple[tuple[str, int], ...] = ()  # per-block-id override (id or id prefix)
  max_seq_len: int = 256  # KV length per slot: prompt + generated tokens
  prefill_chunk: int = 64  # longest prompt piece one step item carries
  length_buckets: tuple[int, ...] = (16, 64)  # padded prefill lengths (decode is length 1)
  max_waiting: int = 256  # admission queue bound; beyond it submit raises OverloadedError
  warmup: bool = True  # compile every bucket at start-up
  compilation_cache_dir: str | None = None  # persistent XLA compilation cache
  trace_size: int = 2000  # batches kept for the trace view

  def kv_slots_for(self, block_id: str) -> int:
    for prefix, slots in self.kv_slots_by_block:
      if block_id.startswith(prefix):
        return slots
    return self.kv_slots

  def batch_size_for(self, block_id: str, kind: str) -> int:
    for prefix, size in self.batch_size_by_block:
      if block_id.startswith(prefix):
        return size
    return dict(self.batch_size_by_kind).get(kind, self.batch_size)

  def batch_buckets(self, batch_size: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < batch_size]
    return buckets + [batch_size]

  def prefill_buckets(self) -> list[int]:
    return sorted({min(b, self.prefill_chunk) for b in self.length_buckets} | {self.prefill_chunk})


@dataclasses.dataclass
class ModelSpec:
  """A model the engine can serve: its config, block chain and tokenizer location."""
  name: str
  config: ModelConfig
  chain: list[Block]  # params may be empty when the blocks are hosted elsewhere
  tokenizer_dir: str | None = None
  block_ids: list[str] | None = None  # the chain's ids (from a manifest); hashed from params if None

  def __post_init__(self):
    if self.block_ids is None:
      self.block_ids = [b.id for b in self.chain]


# (key, block, block_id, batch_size, tied embedding table or None) -> a block instance.
InstanceFactory = Callable[[str, Block, str, int, Any], Any]


@dataclasses.dataclass(eq=False)
class _Request:
  handle: RequestHandle
  model: str
  prompt: list[int]
  params: SamplingParams
  chain: list[BlockInstance]
  stop_ids: frozenset[int]
  slots: dict[int, int] = dataclasses.field(default_factory=dict)  # chain position -> slot
  cached: int = 0  # tokens already written to the KV caches
  generated: list[int] = dataclasses.field(default_factory=list)
  item: "_Item | None" = None
  done: bool = False


@dataclasses.dataclass(eq=False)
class _Item:
  req: _Request
  pos: int  # chain position of the instance it waits for
  start: int  # tokens cached before this item
  n: int  # real tokens it carries
  t_pad: int  # padded length (1 for decode)
  final: bool  # last chunk of the prompt, or a decode step: goes on to the head
  x: Any  # token list (at embed) or (hidden array, row)
  enqueued: float = dataclasses.field(default_factory=time.perf_counter)


class Engine:
  """Serves many models at once; `sharing=False` is the per-model baseline on the same machinery."""

  def __init__(self, models: Sequence[ModelSpec], sharing: bool = True,
               mesh_shape: Sequence[int] | None = None, config: EngineConfig | None = None,
               zoo=None, instance_factory: InstanceFactory | None = None):
    self.config = config or EngineConfig()
    self.sharing = sharing
    self.mesh = mesh_lib.make_mesh(mesh_shape)
    self.zoo = zoo
    self._new_instance = instance_factory or self._local_instance
    if self.config.compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", self.config.compilation_cache_dir)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    self._lock = threading.Condition()
    self._instances: dict[str, BlockInstance] = {}
    self._models: dict[str, tuple[ModelSpec, list[BlockInstance]]] = {}
    self._draining: set[str] = set()
    self._queues: dict[str, collections.deque[_Item]] = {}
    self._waiting: collections.deque[_Request] = collections.deque()
    self._active: set[_Request] = set()
    self._trace: collections.deque[tuple] = collections.deque(maxlen=self.config.trace_size)
    self._batch_counter = itertools.count()
    self._req_counter = itertools.count()
    self._finished = collections.Counter()
    self._closed = False
    for spec in models:
      self._add_model(spec)
    self._thread = threading.Thread(target=self._loop, name="jblock-engine", daemon=True)
    self._thread.start()

  @classmethod
  def from_zoo(cls, zoo_dir: str, models: Sequence[str], sharing: bool = True,
               mesh_shape: Sequence[int] | None = None, config: EngineConfig | None = None) -> "Engine":
    from jblock.zoo.store import Zoo
    zoo = Zoo(zoo_dir)
    blocks: dict[str, Block] = {}  # each distinct block read from disk once
    specs = [_spec_from_zoo(zoo, name, blocks) for name in models]
    return cls(specs, sharing=sharing, mesh_shape=mesh_shape, config=config, zoo=zoo)

  # ---- model management -------------------------------------------------------------------

  def _local_instance(self, key: str, block: Block, block_id: str, batch_size: int, table):
    cfg = self.config
    inst = BlockInstance(key, block, self.mesh, batch_size, cfg.kv_slots_for(block_id),
                         cfg.max_seq_len, shared_table=table, block_id=block_id)
    if cfg.warmup:
      inst.warmup(cfg.batch_buckets(batch_size), [1] + cfg.prefill_buckets(),
                  block.config["hidden_size"], _param_dtype(block))
    return inst

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
        table = inst.embed_table
      chain.append(inst)
    with self._lock:
      for i, inst in enumerate(chain):
        if inst.key not in self._instances:
          self._instances[inst.key] = inst
          self._queues[inst.key] = collections.deque()
        chain[i] = self._instances[inst.key]  # a concurrent load may have registered it first
        chain[i].models.add(spec.name)
      self._models[spec.name] = (spec, chain)
      return self._info(spec)

  def _info(self, spec: ModelSpec) -> ModelInfo:
    c = spec.config
    return ModelInfo(name=spec.name, family=c.family, vocab_size=c.vocab_size,
                     max_seq_len=min(c.max_position_embeddings, self.config.max_seq_len),
                     chain=tuple(spec.block_ids), tokenizer_dir=spec.tokenizer_dir,
                     eos_token_ids=tuple(c.eos_token_ids))

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
    return self._add_model(_spec_from_zoo(self.zoo, name, {}))

  def unload_model(self, name: str, timeout: float = 60.0) -> None:
    """Stops admitting `name`, waits for its in-flight requests, frees blocks no one else uses."""
    with self._lock:
      if name not in self._models:
        raise NotFoundError(f"model {name!r} is not loaded")
      self._draining.add(name)
      deadline = time.monotonic() + timeout
      while any(r.model == name for r in itertools.chain(self._active, self._waiting)):
        if not self._lock.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic()))):
          if time.monotonic() >= deadline:
            raise UnavailableError(f"model {name!r} did not drain within {timeout}s")
      _, chain = self._models.pop(name)
      self._draining.discard(name)
      for inst in chain:
        inst.models.discard(name)
        if not inst.models and inst.key in self._instances:
          del self._instances[inst.key]
          del self._queues[inst.key]

  # ---- requests -----------------------------------------------------------------------------

  def submit(self, model: str, prompt_tokens, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_token_ids=(),
             request_id: str | None = None) -> RequestHandle:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_token_ids=tuple(stop_token_ids))
    prompt = [int(t) for t in prompt_tokens]
    with self._lock:
      if self._closed:
        raise UnavailableError("engine is shut down")
      if model not in self._models or model in self._draining:
        raise NotFoundError(f"model {model!r} is not loaded")
      spec, chain = self._models[model]
      validate_request(self._info(spec), prompt, params)
      if len(self._waiting) >= self.config.max_waiting:
        raise OverloadedError(f"admission queue is full ({self.config.max_waiting} waiting)")
      rid = request_id or f"req-{next(self._req_counter)}"
      handle = RequestHandle(rid, model, len(prompt), params, on_cancel=self._wake)
      stop = frozenset(params.stop_token_ids) | frozenset(spec.config.eos_token_ids)
      self._waiting.append(_Request(handle, model, prompt, params, chain, stop))
      self._lock.notify_all()
    return handle

  def _wake(self, _handle=None) -> None:
    with self._lock:
      self._lock.notify_all()

  def generate(self, model: str, prompt_tokens, **kwargs) -> list[int]:
    return self.submit(model, prompt_tokens, **kwargs).result()

  # ---- scheduler ----------------------------------------------------------------------------

  def _loop(self) -> None:
    while True:
      with self._lock:
        if self._closed and not self._active and not self._waiting:
          return
        self._reap_cancelled()
        self._admit()
        picked = self._pick()
        if picked is None:
          self._lock.wait(timeout=0.05)
          continue
        inst, batch = picked
      try:
        self._run(inst, batch)
      except Exception as e:  # a failed batch fails its requests, never the engine
        with self._lock:
          for item in batch:
            self._finish(item.req, "error", e if isinstance(e, JBlockError) else
                         JBlockError(f"block {inst.block_id[:12]} failed: {e!r}"))
      with self._lock:
        self._lock.notify_all()

  def _admit(self) -> None:
    while self._waiting:
      req = self._waiting[0]
      if req.handle.cancelled:
        self._waiting.popleft()
        self._finish(req, "cancelled")
        continue
      layer_positions = [p for p, inst in enumerate(req.chain) if inst.kind == LAYERS]
      needed = collections.Counter(id(req.chain[p]) for p in layer_positions)
      if any(req.chain[p].slots.free < needed[id(req.chain[p])] for p in layer_positions):
        return  # FIFO: wait for slots to free up
      self._waiting.popleft()
      for p in layer_positions:
        req.slots[p] = req.chain[p].slots.alloc(req.handle.request_id)
      self._active.add(req)
      self._enqueue_prefill(req)

  def _enqueue_prefill(self, req: _Request) -> None:
    start = req.cached
    n = min(self.config.prefill_chunk, len(req.prompt) - start)
    t_pad = next(b for b in self.config.prefill_buckets() if b >= n)
    final = start + n == len(req.prompt)
    self._enqueue(_Item(req, 0, start, n, t_pad, final, req.prompt[start:start + n]))

  def _enqueue(self, item: _Item) -> None:
    item.req.item = item
    self._queues[item.req.chain[item.pos].key].append(item)

  def _pick(self) -> tuple[BlockInstance, list[_Item]] | None:
    """The instance with the fullest queue (relative to its batch size), then the oldest item."""
    best, best_score = None, None
    for key, queue in self._queues.items():
      if not queue:
        continue
      inst = self._instances[key]
      score = (min(len(queue), inst.batch_size) / inst.batch_size, -queue[0].enqueued)
      if best_score is None or score > best_score:
        best, best_score = inst, score
    if best is None:
      return None
    queue = self._queues[best.key]
    t_pad = queue[0].t_pad
    batch = [it for it in queue if it.t_pad == t_pad][:best.batch_size]
    for it in batch:
      queue.remove(it)
    return best, batch

  def _run(self, inst: BlockInstance, batch: list[_Item]) -> None:
    b_pad = next(b for b in self.config.batch_buckets(inst.batch_size) if b >= len(batch))
    t_pad = batch[0].t_pad
    n = len(batch)
    meta = {"slots": np.zeros(b_pad, np.int32), "starts": np.zeros(b_pad, np.int32),
            "n_valid": np.zeros(b_pad, np.int32)}
    for row, it in enumerate(batch):
      meta["slots"][row] = it.req.slots.get(it.pos, 0)
      meta["starts"][row] = it.start
      meta["n_valid"][row] = it.n
    sampling = None
    if inst.kind == EMBED:
      x = np.zeros((b_pad, t_pad), np.int32)
      for row, it in enumerate(batch):
        x[row, :it.n] = it.x
    else:
      x = _gather_rows([it.x for it in batch], b_pad)
    if inst.kind == HEAD:
      sampling = {"temperature": np.zeros(b_pad, np.float32), "top_k": np.zeros(b_pad, np.int32),
                  "top_p": np.ones(b_pad, np.float32), "seed": np.zeros(b_pad, np.int32),
                  "step": np.zeros(b_pad, np.int32)}
      for row, it in enumerate(batch):
        p = it.req.params
        sampling["temperature"][row] = p.temperature
        sampling["top_k"][row] = p.top_k
        sampling["top_p"][row] = p.top_p
        sampling["seed"][row] = p.seed
        sampling["step"][row] = len(it.req.generated)
    y = inst.run(x, meta, sampling)
    if inst.kind == HEAD:
      y = np.asarray(y)  # the one device->host copy per step: the sampled tokens
    inst.batches_run += 1
    inst.items_run += n
    self._trace.append((next(self._batch_counter), inst.kind, inst.block_id[:12], n, b_pad, t_pad,
                        tuple(sorted({it.req.model for it in batch}))))
    with self._lock:
      for row, it in enumerate(batch):
        self._route(it, inst, y, row)

  def _route(self, item: _Item, inst: BlockInstance, y, row: int) -> None:
    req = item.req
    if req.handle.cancelled:
      self._finish(req, "cancelled")
      return
    if inst.kind != HEAD:
      if item.pos == len(req.chain) - 2 and not item.final:
        req.cached = item.start + item.n  # this prompt chunk is in every cache: send the next
        self._enqueue_prefill(req)
        return
      self._enqueue(dataclasses.replace(item, pos=item.pos + 1, x=(y, row), enqueued=time.perf_counter()))
      return
    req.cached = item.start + item.n
    token = int(y[row])
    req.generated.append(token)
    if token in req.stop_ids:  # a stop token ends the request and is not emitted
      self._finish(req, "stop")
      return
    req.handle._emit(token)
    if len(req.generated) >= req.params.max_new_tokens:
      self._finish(req, "length")
    else:
      self._enqueue(_Item(req, 0, req.cached, 1, 1, True, [token]))

  def _reap_cancelled(self) -> None:
    for req in [r for r in self._active if r.handle.cancelled]:
      if req.item is not None:
        queue = self._queues.get(req.chain[req.item.pos].key)
        if queue is not None and req.item in queue:
          queue.remove(req.item)
          self._finish(req, "cancelled")

  def _finish(self, req: _Request, reason: str, error: Exception | None = None) -> None:
    """Frees every KV slot the request holds and ends its stream (once)."""
    if req.done:
      return
    req.done = True
    for pos, slot in req.slots.items():
      req.chain[pos].slots.release(slot)
    req.slots.clear()
    req.item = None
    self._active.discard(req)
    req.handle._finish(reason, error)
    self._finished[req.handle.finish_reason] += 1
    self._lock.notify_all()

  # ---- views --------------------------------------------------------------------------------

  def stats(self) -> dict[str, Any]:
    with self._lock:
      blocks = [inst.stats() for inst in self._instances.values()]
      return {
          "sharing": self.sharing,
          "mesh": dict(self.mesh.shape),
          "blocks": blocks,
          "resident_bytes": sum(b["resident_bytes"] for b in blocks),
          "kv_bytes": sum(b["kv_bytes"] for b in blocks),
          "queue_depth": len(self._waiting) + sum(len(q) for q in self._queues.values()),
          "requests": {"waiting": len(self._waiting), "active": len(self._active),
                       "finished": dict(self._finished)},
          "models": {name: [inst.key for inst in chain] for name, (_, chain) in self._models.items()},
      }

  def trace(self) -> list[dict[str, Any]]:
    with self._lock:
      return [dict(zip(("batch", "kind", "block", "items", "padded_batch", "length", "models"), t))
              for t in self._trace]

  def trace_text(self, last: int = 50) -> str:
    """Plain-text view of the latest batches: which block ran with which requests."""
    lines = [f"{'batch':>6} {'kind':<6} {'block':<12} {'items':>5}/{'pad':<3} {'len':>4}  models"]
    for t in self.trace()[-last:]:
      lines.append(f"{t['batch']:>6} {t['kind']:<6} {t['block']:<12} {t['items']:>5}/{t['padded_batch']:<3} "
                   f"{t['length']:>4}  {','.join(t['models'])}")
    return "\n".join(lines)

  def close(self, drain_timeout: float = 0.0) -> None:
    """Stops admitting; in-flight requests get `drain_timeout` seconds to finish, the rest end
    with an error; then the scheduler thread stops."""
    with self._lock:
      self._closed = True
      deadline = time.monotonic() + drain_timeout
      while (self._active or self._waiting) and time.monotonic() < deadline:
        self._lock.wait(timeout=0.05)
      gone = UnavailableError("engine shut down before the request finished")
      for req in list(self._active) + list(self._waiting):
        self._finish(req, "error", gone)
      self._waiting.clear()
      for queue in self._queues.values():
        queue.clear()
      self._lock.notify_all()
    self._thread.join(30.0)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_rows(batch, source, rows):
  """batch[rows[i]] = source[i]; rows past the batch (out of range) are dropped."""
  return batch.at[rows].set(source, mode="drop")


@jax.jit
def _take_rows(source, rows):
  return jnp.take(source, rows, axis=0)


def _gather_rows(refs: list[tuple[Any, int]], b_pad: int):
  """Stacks items' hidden rows into one [b_pad, T, D] batch.

  Rows are jax arrays on this process's devices (one jitted op per source array, with shapes
  drawn from the batch buckets only, so compilation stays bounded), or numpy arrays that came
  back from a worker. Padding rows are zeros or repeats; their n_valid is 0, so they write
  nothing and are never read.
  """
  first = refs[0][0]
  if (all(a is first for a, _ in refs) and [r for _, r in refs] == list(range(len(refs)))
      and first.shape[0] == b_pad):
    return first  # the whole batch moved on together: no copy
  if all(isinstance(a, np.ndarray) for a, _ in refs):
    out = np.zeros((b_pad,) + first.shape[1:], first.dtype)
    for row, (a, r) in enumerate(refs):
      out[row] = a[r]
    return out
  sources: dict[int, Any] = {}
  for a, _ in refs:
    sources.setdefault(id(a), jnp.asarray(a))
  if len(sources) == 1:
    rows = np.zeros(b_pad, np.int32)
    rows[:len(refs)] = [r for _, r in refs]
    return _take_rows(first, rows)
  batch = jnp.zeros((b_pad,) + first.shape[1:], first.dtype)
  for key, source in sources.items():
    rows = np.full(source.shape[0], b_pad, np.int32)  # b_pad = out of range: dropped
    for row, (a, r) in enumerate(refs):
      if id(a) == key:
        rows[r] = row
    batch = _scatter_rows(batch, source, rows)
  return batch


def _param_dtype(block: Block):
  return np.asarray(flat_leaves(block.params)[0][1]).dtype


def _spec_from_zoo(zoo, name: str, cache: dict[str, Block], load_params: bool = True) -> ModelSpec:
  """A model's spec from its manifest; each block read (and hash-checked) once via `cache`.

  Without params (blocks hosted by workers) only each block's kind and config are read.
  """
  manifest = zoo.manifest(name)
  chain = []
  for block_id in manifest["chain"]:
    if block_id not in cache:
      if load_params:
        cache[block_id] = zoo.load_block(block_id)
      else:
        record = zoo.block_record(block_id)
        cache[block_id] = Block(record["kind"], record["config"], {})
    chain.append(cache[block_id])
  return ModelSpec(name, ModelConfig.from_dict(manifest["config"]), chain, zoo.tokenizer_dir(name),
                   block_ids=list(manifest["chain"]))
