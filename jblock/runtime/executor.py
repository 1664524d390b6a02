"""Executors run the scheduler's block batches; the scheduler never waits on them.

`LocalExecutor` runs segments on this process's mesh: it stages the batch (row gathering as
jitted ops, metadata as two packed arrays), dispatches the fused segment function (JAX's async
dispatch: it returns futures at once) and hands the outputs back through `on_done` — hidden
states as device arrays immediately, sampled tokens once a fetch thread has copied them to the
host. `ThreadExecutor` serves placements whose instances run synchronously (a worker over gRPC):
one thread per placement, so different workers compute at the same time.
"""

import concurrent.futures
import functools
import queue
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jblock.runtime.segments import local_segment_fn
from jblock.runtime.step import BlockBatch

# on_done(batch, output or None, error or None); called from executor threads.
DoneCallback = Callable[[BlockBatch, Any, BaseException | None], None]

# Threads that may compile a fused segment (XLA/LLVM recurse deeply on big modules) get a
# larger stack than the platform default.
COMPILE_STACK_BYTES = 256 << 20


def start_thread(target: Callable[[], None], name: str) -> threading.Thread:
  """A daemon thread with COMPILE_STACK_BYTES of stack."""
  previous = threading.stack_size(COMPILE_STACK_BYTES)
  try:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
  finally:
    threading.stack_size(previous)
  return thread


def stage_input(batch: BlockBatch):
  """The batch's input: tokens [B, T] int32 (numpy) at an embed, else hidden rows [B, T, D]."""
  items = batch.items
  if batch.segment.starts_at_embed:
    x = np.zeros((batch.b_pad, batch.t_pad), np.int32)
    for row, it in enumerate(items):
      x[row, :it.n] = it.x
    return x
  # Rows a worker kept (jblock.cluster.rows.RemoteRows) are read through host_row.
  return gather_rows([src.host_row(row) if hasattr(src, "host_row") else (src, row)
                      for src, row in (it.x for it in items)], batch.b_pad)


def run_local_segment(seg, x, ints, floats, lora_cols=None, head=None):
  """Dispatches one fused segment call on this process's devices and swaps in the updated
  (donated) KV pools; returns y (device arrays). Callers hold the lock that guards the pools.
  `lora_cols`: the batch's LoRA bank columns (StepMeta.lora_cols), None = all; `head`: the
  optional head inputs (StepMeta.head)."""
  layers = seg.layers
  y, kvs = local_segment_fn(seg)([i.run_params for i in seg.instances], [i.kv for i in layers],
                                 x, ints, floats,
                                 [i.lora_bank for i in seg.instances], lora_cols, head)
  for inst, kv in zip(layers, kvs):
    inst.kv = kv
  return y


class LocalExecutor:
  placement = "local"

  def __init__(self, on_done: DoneCallback):
    self._on_done = on_done
    self.dispatch_lock = threading.Lock()  # one dispatch at a time swaps the KV buffers
    self._fetch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jblock-fetch")

  def submit(self, batch: BlockBatch) -> None:
    """Dispatches at once (async on the device); outputs arrive through on_done."""
    seg = batch.segment
    try:
      t0 = time.perf_counter()
      x = stage_input(batch)
      ints, floats = batch.meta.pack()
      with self.dispatch_lock:
        y = run_local_segment(seg, x, ints, floats, batch.meta.lora_cols, batch.meta.head)
      seg.instances[0].dispatch_s += time.perf_counter() - t0
    except Exception as e:  # a failed batch fails its requests, never the engine
      self._on_done(batch, None, e)
      return
    if seg.ends_at_head:
      self._fetch.submit(self._fetch_tokens, batch, y)
    else:
      self._on_done(batch, y, None)

  def _fetch_tokens(self, batch: BlockBatch, y) -> None:
    try:
      tokens = jax.device_get(y)  # the one device->host copy per step (a dict with logprobs)
    except Exception as e:
      self._on_done(batch, None, e)
      return
    self._on_done(batch, tokens, None)

  def close(self) -> None:
    self._fetch.shutdown(wait=True)


class ThreadExecutor:
  """Runs batches of one placement in order on its own thread: `run(batch) -> output`."""

  def __init__(self, placement: str, run: Callable[[BlockBatch], Any], on_done: DoneCallback):
    self.placement = placement
    self._run = run
    self._on_done = on_done
    self._queue: queue.Queue = queue.Queue()
    self._thread = start_thread(self._loop, f"jblock-exec-{placement}")

  def submit(self, batch: BlockBatch) -> None:
    self._queue.put(batch)

  def _loop(self) -> None:
    while True:
      batch = self._queue.get()
      if batch is None:
        return
      try:
        out = self._run(batch)
      except Exception as e:
        self._on_done(batch, None, e)
        continue
      self._on_done(batch, out, None)

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join(30.0)


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_rows(batch, source, rows):
  """batch[rows[i]] = source[i]; rows past the batch (out of range) are dropped."""
  return batch.at[rows].set(source, mode="drop")


@jax.jit
def _take_rows(source, rows):
  return jnp.take(source, rows, axis=0)


def gather_rows(refs: list[tuple[Any, int]], b_pad: int):
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
    return _take_rows(sources[id(first)], rows)
  batch = jnp.zeros((b_pad,) + first.shape[1:], first.dtype)
  for key, source in sources.items():
    rows = np.full(source.shape[0], b_pad, np.int32)  # b_pad = out of range: dropped
    for row, (a, r) in enumerate(refs):
      if id(a) == key:
        rows[r] = row
    batch = _scatter_rows(batch, source, rows)
  return batch
