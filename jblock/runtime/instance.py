"""Block instances: one block's params on a mesh, its KV cache and its jitted step function.

An instance is loaded once per block id (or once per model and block id without sharing) and
runs batches of step items of any model whose chain passes through it. The KV cache of a
layers instance is donated to every call and updated in place.
"""

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jblock.blocks import EMBED, HEAD, LAYERS, Block, flat_leaves
from jblock.models import attention
from jblock.models import blocks as block_fns
from jblock.runtime import mesh as mesh_lib
from jblock.runtime.sampling import sample
from jblock.errors import OverloadedError


class SlotAllocator:
  """Free list of KV slots; a request holds one slot per layers instance of its chain."""

  def __init__(self, capacity: int):
    self.capacity = capacity
    self._free = list(range(capacity - 1, -1, -1))
    self.owners: dict[int, Any] = {}

  @property
  def free(self) -> int:
    return len(self._free)

  def alloc(self, owner) -> int:
    if not self._free:
      raise OverloadedError("no free KV slot")
    slot = self._free.pop()
    self.owners[slot] = owner
    return slot

  def release(self, slot: int) -> None:
    if self.owners.pop(slot, None) is not None:
      self._free.append(slot)


@functools.lru_cache(maxsize=None)
def _step_fn(kind: str, config_json: str, mesh: Mesh, kv_sharding):
  """The jitted step of a block kind/config on a mesh, shared by every instance that fits."""
  apply = block_fns.apply_fn(kind, json.loads(config_json))
  rep = mesh_lib.replicated(mesh)
  if kind == EMBED:
    return jax.jit(lambda params, tokens, meta: apply(params, {}, tokens, meta)[0], out_shardings=rep)
  if kind == LAYERS:
    return jax.jit(apply, donate_argnums=(1,), out_shardings=(rep, {"k": kv_sharding, "v": kv_sharding}))

  def head_step(params, x, meta, sampling):
    # Only each row's last real token reaches the head; sampling runs here, on device.
    last = jnp.maximum(meta["n_valid"] - 1, 0)
    x = x[jnp.arange(x.shape[0]), last][:, None]
    logits = apply(params, {}, x, meta)[0][:, 0]
    return sample(logits, **sampling)

  return jax.jit(head_step, out_shardings=rep)


class BlockInstance:
  """A block resident on a mesh: params, KV cache (layers), step function, batch size, stats."""

  def __init__(self, key: str, block: Block, mesh: Mesh, batch_size: int, kv_slots: int,
               max_len: int, shared_table=None, block_id: str | None = None):
    self.key = key
    self.block_id = block_id or block.id
    self.kind = block.kind
    self.config = block.config
    self.mesh = mesh
    self.batch_size = batch_size
    self.models: set[str] = set()
    self.params = _place(block.params, mesh)
    self.resident_bytes = sum(int(a.nbytes) for _, a in flat_leaves(self.params))
    if self.kind == HEAD and block.config["tied_to"] is not None:
      # The embed instance's table: same device buffer, counted there.
      self.run_params = {**self.params, "embedding": shared_table}
    else:
      self.run_params = self.params
    self.kv = None
    self.slots = SlotAllocator(kv_slots if self.kind == LAYERS else 0)
    kv_spec = None
    if self.kind == LAYERS:
      dtype = next(a for _, a in flat_leaves(self.params)).dtype
      self.pages_per_slot = -(-max_len // attention.DEFAULT_PAGE_SIZE)
      shape = (block.config["num_layers"], kv_slots * self.pages_per_slot,
               attention.DEFAULT_PAGE_SIZE, block.config["num_kv_heads"], block.config["head_dim"])
      kv_spec = mesh_lib.kv_sharding(shape, mesh)
      zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=kv_spec)
      self.kv = {"k": zeros(), "v": zeros()}
      self.kv_bytes = 2 * int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    else:
      self.kv_bytes = 0
    self.max_len = max_len
    self._fn = _step_fn(self.kind, json.dumps(block.config, sort_keys=True), mesh, kv_spec)
    self.batches_run = 0
    self.items_run = 0
    # Host time spent in run(): dispatch, plus waits on donated buffers; device work is async.
    self.dispatch_s = 0.0

  @property
  def embed_table(self):
    return self.params["embedding"]

  def run(self, x, meta: dict[str, np.ndarray], sampling: dict[str, np.ndarray] | None = None):
    """Runs one padded batch. x: tokens [B, T] (embed) or hidden [B, T, D]; returns y or tokens."""
    t0 = time.perf_counter()
    meta = dict(meta)
    slots = np.asarray(meta.pop("slots"), np.int32)
    w = getattr(self, "pages_per_slot", 1)
    meta["page_table"] = slots[:, None] * w + np.arange(w, dtype=np.int32)[None, :]
    meta = {k: jnp.asarray(v, jnp.int32) for k, v in meta.items()}
    if self.kind == EMBED:
      y = self._fn(self.run_params, jnp.asarray(x, jnp.int32), meta)
    elif self.kind == LAYERS:
      y, self.kv = self._fn(self.run_params, self.kv, x, meta)
    else:
      y = self._fn(self.run_params, x, meta, {k: jnp.asarray(v) for k, v in sampling.items()})
    self.dispatch_s += time.perf_counter() - t0
    return y

  def warmup(self, batch_buckets, length_buckets, hidden_size: int, dtype) -> int:
    """Compiles every (batch, length) bucket with writes disabled (n_valid = 0)."""
    count = 0
    for b in batch_buckets:
      for t in length_buckets:
        meta = {"slots": np.zeros(b, np.int32), "starts": np.zeros(b, np.int32),
                "n_valid": np.zeros(b, np.int32)}
        if self.kind == EMBED:
          x = np.zeros((b, t), np.int32)
        else:
          x = jnp.zeros((b, t, hidden_size), dtype)
        sampling = None
        if self.kind == HEAD:
          sampling = idle_sampling(b)
        jax.block_until_ready(self.run(x, meta, sampling))
        count += 1
    self.dispatch_s = 0.0
    return count

  def stats(self) -> dict[str, Any]:
    return {
        "block_id": self.block_id, "key": self.key, "kind": self.kind,
        "models": sorted(self.models), "resident_bytes": self.resident_bytes,
        "kv_bytes": self.kv_bytes, "batch_size": self.batch_size,
        "batches_run": self.batches_run,
        "mean_occupancy": (self.items_run / (self.batches_run * self.batch_size)
                           if self.batches_run else 0.0),
        "kv_slots_used": self.slots.capacity - self.slots.free,
        "kv_slots_free": self.slots.free,
        "dispatch_s": round(self.dispatch_s, 4),
        "placement": f"local:{self.mesh.devices.size} device(s) mesh {dict(self.mesh.shape)}",
    }


def idle_sampling(b: int) -> dict[str, np.ndarray]:
  return {"temperature": np.zeros(b, np.float32), "top_k": np.zeros(b, np.int32),
          "top_p": np.ones(b, np.float32), "seed": np.zeros(b, np.int32),
          "step": np.zeros(b, np.int32)}


def _place(params, mesh: Mesh):
  shardings = mesh_lib.param_shardings(params, mesh)
  return jax.tree.map(lambda a, s: jax.device_put(np.asarray(a) if not isinstance(a, jax.Array) else a, s),
                      params, shardings)
