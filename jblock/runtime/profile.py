"""Per-block step timing: how long one jitted block call takes, per kind and batch size."""

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jblock.blocks import EMBED, LAYERS, Block
from jblock.runtime import mesh as mesh_lib
from jblock.runtime.instance import LocalBlockInstance
from jblock.runtime.kv import pages_for
from jblock.runtime.executor import run_local_segment
from jblock.runtime.segments import Segment
from jblock.runtime.step import StepMeta


def time_block_steps(chain: list[Block], batch_sizes=(1, 2, 4, 8), length: int = 1,
                     max_len: int = 256, repeats: int = 20, mesh_shape=(1, 1),
                     page_size: int = 16) -> list[dict[str, Any]]:
  """Median wall time of one decode (length 1) or prefill call per distinct block kind.

  Every call writes into the KV pages (n_valid = length) at position `max_len // 2`, so the
  attention reads a half-full context, as in the middle of a generation.
  """
  mesh = mesh_lib.make_mesh(mesh_shape)
  rows = []
  seen_kinds = set()
  table = None
  width = pages_for(max_len, page_size)
  for block in chain:
    b_max = max(batch_sizes)
    inst = LocalBlockInstance(block.kind, block, block.kind, mesh, b_max,
                              num_pages=b_max * width if block.kind == LAYERS else 0,
                              page_size=page_size, max_leases=b_max, shared_table=table)
    if block.kind == EMBED:
      table = inst.embed_table
    if block.kind in seen_kinds:
      continue
    seen_kinds.add(block.kind)
    seg = Segment([inst], 0)
    for b in batch_sizes:
      meta = StepMeta.empty(b, len(seg.layers), pages_for(max_len // 2 + length, page_size))
      meta.page_tables[:] = np.arange(b)[None, :, None] * width + np.arange(meta.page_tables.shape[2])
      meta.starts[:] = max_len // 2
      meta.n_valid[:] = length
      ints, floats = meta.pack()
      x = (np.zeros((b, length), np.int32) if block.kind == EMBED
           else jnp.zeros((b, length, block.config["hidden_size"]), inst.dtype))
      times = []
      for i in range(repeats + 2):
        t0 = time.perf_counter()
        jax.block_until_ready(run_local_segment(seg, x, ints, floats))
        if i >= 2:  # the first calls compile
          times.append(time.perf_counter() - t0)
      rows.append({"kind": block.kind, "batch": b, "length": length,
                   "param_bytes": inst.resident_bytes, "median_ms": 1e3 * statistics.median(times)})
  return rows
