"""Local block instances: one block's params on this process's mesh and, for layers, its KV pages.

An instance is loaded once per block id (or once per model and block id without sharing) and
serves every model whose chain passes through it. Params live on the devices only: blocks from a
zoo are restored straight onto their shardings, and in-memory params are placed and not kept.
The KV cache of a layers instance is a page pool ([layers, pages, KVH, page_size, hd]) donated
to every call and updated in place; `pool` leases its pages to requests.
"""

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jblock.blocks import HEAD, LAYERS, Block
from jblock.errors import UnavailableError
from jblock.runtime import mesh as mesh_lib
from jblock.runtime.kv import PagePool


class InstanceBase:
  """What every block instance declares (jblock.runtime.step.BlockInstance), with defaults:
  an implementation sets what differs. Read as plain attributes, never probed."""
  local = False  # runs on this process's mesh: fuses with its neighbours, KV swapped in place
  remote = False  # hosted by a worker over gRPC: re-placed when its worker is lost
  executor_key = ""  # the executor that runs it when not local
  address = ""  # its worker's address (remote)
  available = True  # False while it is being re-placed
  lost_reason = ""  # set when it could not be re-placed anywhere
  params = None  # its params on this process's devices (local)
  embed_table = None  # an embed's table, shared with a tied head
  lora_bank = None  # LoRA adapter bank targets (jblock.runtime.lora), once an adapter needs one
  lora_bank_bytes = 0
  kv_bytes = 0
  dispatch_s = 0.0  # host time spent dispatching; device work itself is async
  batches_run = 0
  items_run = 0

  def close(self) -> None:
    """Frees what it holds elsewhere (a remote one unhosts itself); local memory goes with it."""

  def recover(self, reason: str, to: str | None = None) -> None:
    raise UnavailableError(f"block {self.block_id[:12]} cannot be re-placed ({reason})")


class LocalBlockInstance(InstanceBase):
  """A block resident on a mesh: params, KV page pool (layers), batch size, counters."""
  local = True

  def __init__(self, key: str, block: Block, block_id: str, mesh: Mesh, batch_size: int,
               num_pages: int = 0, page_size: int = 16, max_leases: int = 0, shared_table=None):
    self.key = key
    self.block_id = block_id
    self.kind = block.kind
    self.config = block.config
    self.config_json = json.dumps(block.config, sort_keys=True)
    self.mesh = mesh
    self.batch_size = batch_size
    self.models: set[str] = set()
    # Blocks from an engine's part pool (jblock.runtime.parts) arrive placed, experts as tuples.
    self.params = block.params if _has_tuples(block.params) else _place(block.params, mesh)
    leaves = jax.tree.leaves(self.params)
    self.dtype = leaves[0].dtype if leaves else jnp.float32
    self.resident_bytes = sum(int(a.nbytes) for a in leaves)  # shared parts counted here too
    self.tied = self.kind == HEAD and block.config.get("tied_to") is not None
    # A tied head runs with the embed instance's table: same device buffer, counted there.
    self.run_params = {**self.params, "embedding": shared_table} if self.tied else self.params
    self.pool = None
    self.kv = None
    self.kv_sharding = None
    self.kv_bytes = 0
    if self.kind == LAYERS:
      shape = (block.config["num_layers"], num_pages, block.config["num_kv_heads"], page_size,
               block.config["head_dim"])
      self.kv_sharding = mesh_lib.kv_sharding(shape, mesh)
      zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=self.kv_sharding)
      self.kv = {"k": zeros(), "v": zeros()}
      self.kv_bytes = 2 * int(np.prod(shape)) * jnp.dtype(self.dtype).itemsize
      self.pool = PagePool(num_pages, page_size, max_leases)
      self.pool.window = window_reach(block.config)
    self.lora_bank = None  # LoRA adapter bank (jblock.runtime.lora), once an adapter needs it
    self.lora_bank_bytes = 0
    self.placement = f"local:{mesh.devices.size} device(s) mesh {dict(mesh.shape)}"
    self.batches_run = 0
    self.items_run = 0
    self.dispatch_s = 0.0  # host time spent dispatching; device work itself is async

  @property
  def embed_table(self):
    return self.params["embedding"] if self.kind == "embed" else None

  def stats(self) -> dict[str, Any]:
    return instance_stats(self)


def window_reach(config: dict) -> int:
  """The farthest back any layer of a layers block attends: its largest sliding window when
  every layer has one, else 0 (full attention: everything stays reachable)."""
  windows = config.get("sliding_windows") or []
  return max(windows) if windows and all(w > 0 for w in windows) else 0


def instance_stats(inst) -> dict[str, Any]:
  """The stats every instance reports (local or remote)."""
  pool = inst.pool
  return {
      "block_id": inst.block_id, "key": inst.key, "kind": inst.kind,
      "models": sorted(inst.models), "resident_bytes": inst.resident_bytes,
      "kv_bytes": inst.kv_bytes, "batch_size": inst.batch_size,
      "batches_run": inst.batches_run,
      "mean_occupancy": (inst.items_run / (inst.batches_run * inst.batch_size)
                         if inst.batches_run else 0.0),
      "kv_slots_used": pool.leases if pool else 0,
      "kv_slots_free": pool.max_leases - pool.leases if pool else 0,
      "kv_pages_used": pool.num_pages - pool.free_pages if pool else 0,
      "kv_pages_free": pool.free_pages if pool else 0,
      **(pool.cache_stats() if pool else {}),
      "dispatch_s": round(inst.dispatch_s, 4),
      "lora_bank_bytes": inst.lora_bank_bytes,
      "placement": inst.placement,
  }


def _has_tuples(tree) -> bool:
  return any(isinstance(v, tuple) or (isinstance(v, dict) and _has_tuples(v))
             for v in tree.values())


def _place(params, mesh: Mesh):
  """Params on their shardings; arrays already on devices (restored from a zoo) stay put."""
  shardings = mesh_lib.param_shardings(params, mesh)

  def put(a, s):
    if isinstance(a, jax.Array) and a.sharding == s:
      return a
    return jax.device_put(a if isinstance(a, jax.Array) else np.asarray(a), s)

  return jax.tree.map(put, params, shardings)
