"""Per-block step timing: how long one jitted block call takes, per kind and batch size."""

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jblock.blocks import EMBED, HEAD, Block, flat_leaves
from jblock.runtime import mesh as mesh_lib
from jblock.runtime.instance import BlockInstance, idle_sampling


def time_block_steps(chain: list[Block], batch_sizes=(1, 2, 4, 8), length: int = 1,
                     max_len: int = 256, repeats: int = 20, mesh_shape=(1, 1)) -> list[dict[str, Any]]:
  """Median wall time of one decode (length 1) or prefill call per distinct block kind.

  Every call writes into the KV cache (n_valid = length) at position `max_len // 2`, so the
  attention reads a half-full cache, as in the middle of a generation.
  """
  mesh = mesh_lib.make_mesh(mesh_shape)
  rows = []
  seen_kinds = set()
  table = None
  for block in chain:
    inst = BlockInstance(block.kind, block, mesh, max(batch_sizes), max(batch_sizes), max_len,
                         shared_table=table)
    if block.kind == EMBED:
      table = inst.embed_table
    if block.kind in seen_kinds:
      continue
    seen_kinds.add(block.kind)
    dtype = np.asarray(flat_leaves(block.params)[0][1]).dtype
    for b in batch_sizes:
      meta = {"slots": np.arange(b, dtype=np.int32), "starts": np.full(b, max_len // 2, np.int32),
              "n_valid": np.full(b, length, np.int32)}
      x = (np.zeros((b, length), np.int32) if block.kind == EMBED
           else jnp.zeros((b, length, block.config["hidden_size"]), dtype))
      sampling = idle_sampling(b) if block.kind == HEAD else None
      times = []
      for i in range(repeats + 2):
        t0 = time.perf_counter()
        jax.block_until_ready(inst.run(x, meta, sampling))
        if i >= 2:  # the first calls compile
          times.append(time.perf_counter() - t0)
      rows.append({"kind": block.kind, "batch": b, "length": length,
                   "param_bytes": inst.resident_bytes, "median_ms": 1e3 * statistics.median(times)})
  return rows

