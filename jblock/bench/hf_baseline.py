"""The Hugging Face transformers baseline, behind the same engine interface and gRPC server.

Each variant is its own torch model (float32, eval). Requests queue per model; one worker
thread serves the model whose oldest request waited longest, taking up to `batch_size` of its
queued requests as one left-padded batch (attention mask) through `generate(do_sample=False)`:
static batching, the way transformers is used without a serving system on top.

TTFT is measured, not estimated: a StoppingCriteria runs after every decoding step of the
batch and hands each row's new token to its request at once, so a request's first token is
stamped when the batch's prefill plus first step finishes, and later tokens stream per step.
A request that asked for fewer tokens than its batch-mates stops streaming at its own count
(it still waits in the batch's compute until the longest one ends, as in real static batching).
"""

import collections
import os
import threading
import time
from typing import Sequence

import numpy as np

from jblock.errors import InvalidRequestError, NotFoundError, OverloadedError, UnavailableError
from jblock.runtime.engine_api import (ModelInfo, RequestHandle, SamplingParams,
                                       new_request_id, sampling_params, validate_request)

_PLAIN_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids")


def _emit_each_step(handles: list[RequestHandle], stop_ids: list[frozenset[int]],
                    prompt_width: int):
  """A StoppingCriteria that streams each row's newest token; rows stop at their own count or
  at a stop token (not emitted, as in the block engine)."""
  import torch
  import transformers

  class EmitEachStep(transformers.StoppingCriteria):

    def __call__(self, input_ids, scores, **kwargs):
      new = input_ids.shape[1] - prompt_width
      last = input_ids[:, -1].tolist()
      for row, handle in enumerate(handles):
        if handle.done:
          continue
        if last[row] in stop_ids[row]:
          handle._finish("stop")
          continue
        handle._emit(last[row])
        if new >= handle.params.max_new_tokens:
          handle._finish("length")
      return torch.tensor([h.done for h in handles], dtype=torch.bool, device=input_ids.device)

  return EmitEachStep()


class HFEngine:
  """engine_api.Engine over torch transformers models: one model per variant, batched per model."""

  def __init__(self, model_dirs: dict[str, str], batch_size: int = 8, max_waiting: int = 256,
               max_seq_len: int = 256, threads: int | None = None):
    import torch
    import transformers
    self._torch = torch
    torch.set_num_threads(threads or os.cpu_count() or 1)
    self.batch_size = batch_size
    self.max_waiting = max_waiting
    self._models = {}
    self._infos = {}
    for name, directory in model_dirs.items():
      model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
      model.eval()
      config = model.config
      eos = config.eos_token_id
      eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
      self._models[name] = model
      self._infos[name] = ModelInfo(
          name=name, family=config.model_type, vocab_size=config.vocab_size,
          max_seq_len=min(max_seq_len, getattr(config, "max_position_embeddings", None)
                          or getattr(config, "n_positions", max_seq_len)),
          chain=(), eos_token_ids=eos_ids)
    self._lock = threading.Condition()
    self._queues: dict[str, collections.deque] = {name: collections.deque() for name in model_dirs}
    self._batches = 0
    self._items = 0
    self._closed = False
    self._thread = threading.Thread(target=self._loop, name="hf-baseline", daemon=True)
    self._thread.start()

  # ---- engine_api.Engine

  def submit(self, model: str, prompt_tokens: Sequence[int], *, request_id: str | None = None,
             tenant: str | None = None, accuracy_budget: float | None = None,
             constraint=None, **sampling) -> RequestHandle:
    del tenant, accuracy_budget  # one queue per model: static batching knows no tenants
    params = sampling_params(**sampling)
    plain = SamplingParams(**{f: getattr(params, f) for f in _PLAIN_FIELDS})
    if constraint is not None or params != plain:
      raise InvalidRequestError("sampling", "the transformers baseline samples with temperature, "
                                "top-k, top-p, seed and stop ids only")
    prompt = [int(t) for t in prompt_tokens]
    with self._lock:
      if self._closed:
        raise UnavailableError("engine is shut down")
      if model not in self._infos:
        raise NotFoundError(f"model {model!r} is not loaded")
      validate_request(self._infos[model], prompt, params)
      if sum(len(q) for q in self._queues.values()) >= self.max_waiting:
        raise OverloadedError(f"admission queue is full ({self.max_waiting} waiting)")
      handle = RequestHandle(request_id or new_request_id(), model, len(prompt), params)
      self._queues[model].append((handle, prompt, time.monotonic()))
      self._lock.notify_all()
    return handle

  def list_models(self) -> list[ModelInfo]:
    return [self._infos[name] for name in sorted(self._infos)]

  def load_model(self, name: str) -> ModelInfo:
    if name in self._infos:
      return self._infos[name]
    raise NotFoundError(f"the transformers baseline loads its models at start-up only ({name!r})")

  def unload_model(self, name: str) -> None:
    raise NotFoundError("the transformers baseline does not unload models")

  def admission_limit(self) -> int:
    """The admission queue plus one batch per model running."""
    return self.max_waiting + self.batch_size * len(self._infos)

  def stats(self) -> dict:
    resident = sum(p.numel() * p.element_size() for m in self._models.values()
                   for p in m.parameters())
    with self._lock:
      waiting = sum(len(q) for q in self._queues.values())
      return {"sharing": False, "blocks": [], "resident_bytes": int(resident),
              "queue_depth": waiting,
              "requests": {"waiting": waiting, "batches": self._batches, "served": self._items}}

  def close(self) -> None:
    with self._lock:
      self._closed = True
      gone = UnavailableError("engine shut down before the request finished")
      for queue in self._queues.values():
        for handle, _, _ in queue:
          handle._finish("error", gone)
        queue.clear()
      self._lock.notify_all()
    self._thread.join(60.0)

  # ---- serving loop

  def _next_batch(self):
    """The model whose oldest request waited longest, and up to batch_size of its requests."""
    live = [(q[0][2], name) for name, q in self._queues.items() if q]
    if not live:
      return None, []
    _, name = min(live)
    queue = self._queues[name]
    batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
    return name, [b for b in batch if not b[0].cancelled]

  def _loop(self) -> None:
    while True:
      with self._lock:
        if self._closed:
          return
        name, batch = self._next_batch()
        if name is None:
          self._lock.wait(0.05)
          continue
      if batch:
        try:
          self._generate(name, batch)
        except Exception as e:  # a failed batch fails its requests, never the server
          for handle, _, _ in batch:
            if not handle.done:
              handle._finish("error", UnavailableError(f"transformers generate failed: {e!r}"))
        with self._lock:
          self._batches += 1
          self._items += len(batch)

  def _generate(self, name: str, batch) -> None:
    torch = self._torch
    width = max(len(prompt) for _, prompt, _ in batch)
    ids = np.zeros((len(batch), width), np.int64)
    mask = np.zeros((len(batch), width), np.int64)
    for row, (_, prompt, _) in enumerate(batch):  # left padding: every row ends at the same column
      ids[row, width - len(prompt):] = prompt
      mask[row, width - len(prompt):] = 1
    handles = [handle for handle, _, _ in batch]
    eos = frozenset(self._infos[name].eos_token_ids)
    stops = [eos | frozenset(h.params.stop_token_ids) for h in handles]
    longest = max(h.params.max_new_tokens for h in handles)
    with torch.inference_mode():
      self._models[name].generate(
          input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
          do_sample=False, max_new_tokens=longest, pad_token_id=0,
          stopping_criteria=[_emit_each_step(handles, stops, width)])
    for handle in handles:  # e.g. cut short by the model's maximum length
      if not handle.done:
        handle._finish("length")
