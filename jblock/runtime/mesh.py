"""Device mesh and sharding rules for block params and KV caches.

Axes: `data` (batch / KV slots) and `model` (attention heads and MLP width). A dimension is
split only when the axis size divides it; otherwise it stays replicated (always correct,
just less parallel).
"""

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jblock.blocks import flat_leaves

DATA, MODEL = "data", "model"

# Param path (inside a block, layer prefix removed) -> which dim goes on the model axis.
# Column-parallel projections split their output dim, row-parallel ones their input dim.
_MODEL_DIM_RULES = [
    (r"attn/(q|k|v)/kernel$", 1),
    (r"attn/(q|k|v)/bias$", 0),
    (r"attn/o/kernel$", 0),
    (r"mlp/(gate|up|fc)/kernel$", 1),
    (r"mlp/(gate|up|fc)/bias$", 0),
    (r"mlp/(down|proj)/kernel$", 0),
    # Stacked experts of a mixture-of-experts layer: [experts, in, out] and [experts, out, in].
    (r"mlp/experts/(gate|up)$", 2),
    (r"mlp/experts/down$", 1),
    (r"^lm_head$", 1),
    (r"^embedding$", 0),  # vocab-parallel table (embed and tied head)
]


def make_mesh(mesh_shape: Sequence[int] | None = None, devices=None) -> Mesh:
  """(data, model) mesh over the first data*model devices; default: all on the model axis."""
  devices = list(devices if devices is not None else jax.local_devices())
  if mesh_shape is None:
    mesh_shape = (1, len(devices))
  mesh_shape = tuple(int(n) for n in mesh_shape)
  if len(mesh_shape) != 2 or min(mesh_shape) < 1 or int(np.prod(mesh_shape)) > len(devices):
    raise ValueError(f"mesh_shape {mesh_shape} must be (data, model) with data*model <= "
                     f"{len(devices)} local devices")
  devices = devices[:int(np.prod(mesh_shape))]
  # Auto axes: GSPMD propagates shardings through the block functions.
  return Mesh(np.asarray(devices).reshape(mesh_shape), (DATA, MODEL),
              axis_types=(AxisType.Auto, AxisType.Auto))


def _spec(shape: tuple[int, ...], dims: dict[int, str], mesh: Mesh) -> P:
  parts = [None] * len(shape)
  for dim, axis in dims.items():
    if shape[dim] % mesh.shape[axis] == 0 and mesh.shape[axis] > 1:
      parts[dim] = axis
  return P(*parts)


def param_shardings(params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
  """A NamedSharding per param leaf, same tree structure as params."""
  out: dict[str, Any] = {}
  for path, leaf in flat_leaves(params):
    local = re.sub(r"^layer_\d+/", "", path)
    dims = {}
    for pattern, dim in _MODEL_DIM_RULES:
      if re.search(pattern, local):
        dims = {dim: MODEL}
        break
    node = out
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
    node[name] = NamedSharding(mesh, _spec(shape, dims, mesh))
  return out


def kv_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """KV buffers [layers, pages, kv_heads, page_size, head_dim]: pages on data, heads on model."""
  return NamedSharding(mesh, _spec(shape, {1: DATA, 2: MODEL}, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
