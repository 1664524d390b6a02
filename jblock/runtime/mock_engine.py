"""A real threaded engine with fake arithmetic, so serving is testable on CPU without models.

MockEngine does everything the block engine does around the model: admission with a
bounded queue, one KV slot per request in every block of its chain, per-block batching
stats, continuous batching in a step loop, stop ids, cancel, drain on unload. Only the
next token is fake and deterministic (`mock_next_token`), a function of the request's own
context, so a request's output never depends on its batch-mates.
"""

import collections
import dataclasses
import math
import threading
import time
from typing import Mapping, Sequence

from jblock.errors import NotFoundError, OverloadedError, UnavailableError
from jblock.runtime import engine_api
from jblock.runtime.engine_api import ModelInfo, RequestHandle, SamplingParams

MOCK_PLACEMENT = "mock:0"


def mock_next_token(context_sum: int, step: int, vocab_size: int, seed: int = 0,
                    temperature: float = 0.0) -> int:
  """The fake model: next = (sum(context) * 31 + step) % vocab; sampling mixes in the seed."""
  salt = seed * 7919 if temperature > 0 else 0
  return (context_sum * 31 + step + salt) % vocab_size


def mock_generate(info: ModelInfo, prompt_tokens: Sequence[int],
                  params: SamplingParams = SamplingParams()) -> tuple[list[int], str]:
  """What MockEngine returns for a request, computed without the engine: (tokens, reason)."""
  stop_ids = set(params.stop_token_ids) | set(info.eos_token_ids)
  context_sum, length, tokens = sum(prompt_tokens), len(prompt_tokens), []
  while True:
    token = mock_next_token(context_sum, len(tokens), info.vocab_size, params.seed,
                            params.temperature)
    if token in stop_ids:
      return tokens, engine_api.STOP
    tokens.append(token)
    context_sum += token
    length += 1
    if len(tokens) == params.max_new_tokens or length >= info.max_seq_len:
      return tokens, engine_api.LENGTH


def mock_models(names: Sequence[str], vocab_size: int = 256, max_seq_len: int = 256,
                tokenizer_dir: str | None = None, eos_token_ids: tuple[int, ...] = ()
                ) -> dict[str, ModelInfo]:
  """Variants of one base: they share its embedding and first layers block, each has its
  own top layers and head (a partial fine-tune), so Stats shows sharing."""
  return {
      name: ModelInfo(name=name, family="mock", vocab_size=vocab_size, max_seq_len=max_seq_len,
                      chain=("mock-embed", "mock-layers-0", f"mock-layers-1-{name}",
                             f"mock-head-{name}"),
                      tokenizer_dir=tokenizer_dir, eos_token_ids=tuple(eos_token_ids))
      for name in names
  }


@dataclasses.dataclass
class _Block:
  block_id: str
  kind: str
  kv_slots: int
  batch_size: int
  resident_bytes: int
  models: set[str] = dataclasses.field(default_factory=set)
  holders: set[str] = dataclasses.field(default_factory=set)  # request ids holding a slot
  batches_run: int = 0
  occupancy_sum: float = 0.0  # sum over batches of rows / batch_size

  def stats(self) -> dict:
    return {
        "block_id": self.block_id, "kind": self.kind, "models": sorted(self.models),
        "resident_bytes": self.resident_bytes, "batch_size": self.batch_size,
        "batches_run": self.batches_run,
        "mean_occupancy": self.occupancy_sum / self.batches_run if self.batches_run else 0.0,
        "kv_slots_used": len(self.holders), "kv_slots_free": self.kv_slots - len(self.holders),
        "placement": MOCK_PLACEMENT,
    }


@dataclasses.dataclass(eq=False)  # identity: two requests are never the same
class _Request:
  handle: RequestHandle
  info: ModelInfo
  params: SamplingParams
  stop_ids: frozenset[int]
  context_sum: int
  length: int
  generated: int = 0


def _block_kind(position: int, chain_len: int) -> str:
  if position == 0:
    return "embed"
  return "head" if position == chain_len - 1 else "layers"


class MockEngine:
  """Implements engine_api.Engine with fake tokens; see the module docstring."""

  def __init__(self, models: Mapping[str, ModelInfo], *, step_delay_s: float = 0.0,
               max_queue: int = 64, kv_slots: int = 16, batch_size: int = 8,
               block_bytes: int = 1 << 20, zoo: Mapping[str, ModelInfo] | None = None):
    """`models` are loaded at start; `zoo` (default: `models`) is what load_model can load.
    Every block gets `kv_slots` slots and runs batches of up to `batch_size` rows."""
    for name, info in models.items():
      if name != info.name:
        raise ValueError(f"model key {name!r} differs from its ModelInfo.name {info.name!r}")
    self._zoo = dict(zoo if zoo is not None else models)
    self._step_delay_s = step_delay_s
    self._max_queue = max_queue
    self._kv_slots = kv_slots
    self._batch_size = batch_size
    self._block_bytes = block_bytes
    self._cond = threading.Condition()
    self._loaded: dict[str, ModelInfo] = {}
    self._unloading: set[str] = set()
    self._blocks: dict[str, _Block] = {}
    self._queue: collections.deque[_Request] = collections.deque()
    self._running: dict[str, _Request] = {}
    self._counters = collections.Counter()
    self._closed = False
    for info in models.values():
      self._zoo.setdefault(info.name, info)
      self._load_locked(info)
    self._thread = threading.Thread(target=self._loop, name="mock-engine", daemon=True)
    self._thread.start()

  # --- Engine API

  def submit(self, model: str, prompt_tokens: Sequence[int], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_token_ids: Sequence[int] = (), request_id: str | None = None) -> RequestHandle:
    prompt_tokens = list(prompt_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_token_ids=tuple(stop_token_ids))
    with self._cond:
      if self._closed:
        raise UnavailableError("engine is closed")
      info = self._admitting_model_locked(model)
      engine_api.validate_request(info, prompt_tokens, params)
      handle = RequestHandle(request_id or engine_api.new_request_id(), model,
                             len(prompt_tokens), params, on_cancel=self._cancel)
      request = _Request(handle, info, params,
                         frozenset(params.stop_token_ids) | frozenset(info.eos_token_ids),
                         context_sum=sum(int(t) for t in prompt_tokens), length=len(prompt_tokens))
      if self._fits_locked(request):
        self._start_locked(request)
      elif len(self._queue) >= self._max_queue:
        self._counters["rejected"] += 1
        raise OverloadedError(
            f"admission queue is full ({self._max_queue} waiting, every KV slot of model "
            f"{model!r}'s blocks in use); retry later")
      else:
        self._queue.append(request)
      self._counters["submitted"] += 1
      self._cond.notify_all()
      return handle

  def list_models(self) -> list[ModelInfo]:
    with self._cond:
      return [info for name, info in self._loaded.items() if name not in self._unloading]

  def load_model(self, name: str) -> ModelInfo:
    with self._cond:
      if name in self._unloading:
        raise UnavailableError(f"model {name!r} is being unloaded; load it again afterwards")
      if name in self._loaded:
        return self._loaded[name]
      if name not in self._zoo:
        raise NotFoundError(f"model {name!r} is not in the zoo; known: {sorted(self._zoo)}")
      self._load_locked(self._zoo[name])
      return self._zoo[name]

  def unload_model(self, name: str) -> None:
    with self._cond:
      self._admitting_model_locked(name)
      self._unloading.add(name)
      # Drains: every request of the model finishes (each is bounded by max_new_tokens).
      while self._has_requests_locked(name) and not self._closed:
        self._cond.wait(engine_api.WAIT_POLL_S)
      for block_id in self._loaded.pop(name).chain:
        block = self._blocks[block_id]
        block.models.discard(name)
        if not block.models:
          del self._blocks[block_id]
      self._unloading.discard(name)

  def stats(self) -> dict:
    with self._cond:
      return {
          "blocks": [block.stats() for block in self._blocks.values()],
          "queue_depth": len(self._queue),
          "requests": {
              "submitted": self._counters["submitted"], "running": len(self._running),
              "queued": len(self._queue), "completed": self._counters["completed"],
              "cancelled": self._counters["cancelled"], "failed": self._counters["failed"],
              "rejected": self._counters["rejected"],
          },
      }

  def close(self) -> None:
    with self._cond:
      if self._closed:
        return
      self._closed = True
      outstanding = list(self._running.values()) + list(self._queue)
      for request in outstanding:
        self._end_locked(request, engine_api.ERROR, UnavailableError("engine closed"))
      self._queue.clear()
      self._cond.notify_all()
    self._thread.join(timeout=5)

  # --- internals; *_locked methods run under self._cond

  def _admitting_model_locked(self, name: str) -> ModelInfo:
    if name in self._unloading:
      raise UnavailableError(f"model {name!r} is being unloaded")
    if name not in self._loaded:
      raise NotFoundError(f"model {name!r} is not loaded; loaded: {sorted(self._loaded)}")
    return self._loaded[name]

  def _load_locked(self, info: ModelInfo) -> None:
    for position, block_id in enumerate(info.chain):
      block = self._blocks.get(block_id)
      if block is None:
        block = _Block(block_id, _block_kind(position, len(info.chain)), self._kv_slots,
                       self._batch_size, self._block_bytes)
        self._blocks[block_id] = block
      block.models.add(info.name)
    self._loaded[info.name] = info

  def _has_requests_locked(self, model: str) -> bool:
    return any(r.info.name == model for r in [*self._running.values(), *self._queue])

  def _fits_locked(self, request: _Request) -> bool:
    return all(len(self._blocks[b].holders) < self._blocks[b].kv_slots for b in request.info.chain)

  def _start_locked(self, request: _Request) -> None:
    for block_id in request.info.chain:
      self._blocks[block_id].holders.add(request.handle.request_id)
    self._running[request.handle.request_id] = request

  def _admit_queued_locked(self) -> None:
    # First fit in arrival order: a request waiting on one model's blocks does not hold up
    # requests of other models whose blocks have room.
    for request in list(self._queue):
      if self._fits_locked(request):
        self._queue.remove(request)
        self._start_locked(request)

  def _end_locked(self, request: _Request, reason: str, error: BaseException | None = None):
    request_id = request.handle.request_id
    if self._running.pop(request_id, None) is not None:
      for block_id in request.info.chain:
        block = self._blocks.get(block_id)
        if block is not None:
          block.holders.discard(request_id)
    elif request in self._queue:
      self._queue.remove(request)
    else:
      return  # already ended
    key = {engine_api.STOP: "completed", engine_api.LENGTH: "completed",
           engine_api.CANCELLED: "cancelled", engine_api.ERROR: "failed"}[reason]
    self._counters[key] += 1
    request.handle._finish(reason, error)

  def _cancel(self, handle: RequestHandle) -> None:
    with self._cond:
      request = self._running.get(handle.request_id)
      if request is None:
        request = next((r for r in self._queue if r.handle is handle), None)
      if request is not None:
        self._end_locked(request, engine_api.CANCELLED)
        self._admit_queued_locked()
      self._cond.notify_all()

  def _loop(self) -> None:
    while True:
      with self._cond:
        while not self._running and not self._closed:
          self._cond.wait(engine_api.WAIT_POLL_S)
        if self._closed:
          return
      # The "compute" of one step, outside the lock so submit/cancel/stats stay responsive.
      if self._step_delay_s:
        time.sleep(self._step_delay_s)
      with self._cond:
        if self._closed:
          return
        self._step_locked()
        self._admit_queued_locked()
        self._cond.notify_all()
      if not self._step_delay_s:
        time.sleep(0)  # let waiting threads take the lock between steps

  def _step_locked(self) -> None:
    requests = list(self._running.values())
    rows = collections.Counter(b for r in requests for b in r.info.chain)
    for block_id, n in rows.items():
      block = self._blocks[block_id]
      block.batches_run += math.ceil(n / block.batch_size)
      block.occupancy_sum += n / block.batch_size
    for request in requests:
      params = request.params
      token = mock_next_token(request.context_sum, request.generated, request.info.vocab_size,
                              params.seed, params.temperature)
      if token in request.stop_ids:
        self._end_locked(request, engine_api.STOP)
        continue
      request.handle._emit(token)
      request.context_sum += token
      request.length += 1
      request.generated += 1
      if request.generated == params.max_new_tokens or request.length >= request.info.max_seq_len:
        self._end_locked(request, engine_api.LENGTH)
