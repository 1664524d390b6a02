"""A block's params pytree on disk: one orbax-checkpoint directory, plus block.json beside it.

block.json records what the hash needs besides the params (kind, compute config) and the
leaf list, so a restore knows the tree without reading orbax metadata and `zoo show`
needs no array reads.
"""

import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jblock.blocks import Block, flat_leaves

RECORD_FILE = "block.json"
BLOCK_ID = re.compile(r"[0-9a-f]{64}")  # a block's id, and its directory's name under blocks/
RECORD_FORMAT = "jblock-block-record-v1"

# None (numpy arrays), one Sharding for every leaf, a pytree of Shardings shaped like the
# params (a Sharding may stand for a whole subtree), or a function of the '/'-joined leaf path.
ShardingSpec = Any


def record(block: Block, block_id: str) -> dict[str, Any]:
  # .dtype/.shape, not np.asarray: a device-resident leaf must not be copied to the host here.
  leaves = {path: {"dtype": str(np.dtype(a.dtype)), "shape": [int(d) for d in a.shape]}
            for path, a in flat_leaves(block.params)}
  return {"format": RECORD_FORMAT, "id": block_id, "kind": block.kind, "config": block.config,
          "nbytes": block.nbytes, "leaves": leaves}


def save(directory: str, params: dict[str, Any]) -> None:
  """Writes params (numpy or jax arrays) as an orbax checkpoint at `directory` (must not exist)."""
  host = jax.tree.map(np.asarray, params)
  if not flat_leaves(host):
    os.mkdir(directory)  # orbax refuses an empty tree; block.json alone describes this block
    return
  ocp.PyTreeCheckpointer().save(os.path.abspath(directory), host)


def restore_args(leaves: dict[str, dict[str, Any]],
                 sharding: ShardingSpec = None) -> dict[str, Any]:
  """orbax restore args per leaf; a sharding tree that does not fit raises ValueError here."""
  args: dict[str, Any] = {}
  for path, spec in leaves.items():
    if sharding is None:
      arg = ocp.RestoreArgs(restore_type=np.ndarray)
    else:
      arg = ocp.ArrayRestoreArgs(sharding=_sharding_for(sharding, path),
                                 global_shape=tuple(spec["shape"]))
    _set(args, path, arg)
  return args


def restore(directory: str, args: dict[str, Any]) -> dict[str, Any]:
  """Reads the params back: numpy arrays, or jax Arrays placed as `args` say."""
  if not args:
    return {}
  return ocp.PyTreeCheckpointer().restore(os.path.abspath(directory), restore_args=args)


def place(params: dict[str, Any], sharding: ShardingSpec) -> dict[str, Any]:
  """numpy params -> jax Arrays placed as `sharding` says (blocks assembled from parts)."""
  out: dict[str, Any] = {}
  for path, leaf in flat_leaves(params):
    _set(out, path, jax.device_put(leaf, _sharding_for(sharding, path)))
  return out


def _sharding_for(sharding: ShardingSpec, path: str) -> jax.sharding.Sharding:
  if callable(sharding):
    return sharding(path)
  node = sharding
  for key in path.split("/"):
    if isinstance(node, jax.sharding.Sharding):
      return node  # one sharding for a whole subtree
    if not isinstance(node, dict) or key not in node:
      raise ValueError(f"the sharding tree has no entry for param {path!r}")
    node = node[key]
  if not isinstance(node, jax.sharding.Sharding):
    raise ValueError(f"the sharding tree's entry for param {path!r} is not a Sharding: {node!r}")
  return node


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def read_record(directory: str) -> dict[str, Any]:
  with open(os.path.join(directory, RECORD_FILE)) as f:
    rec = json.load(f)
  if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
    raise ValueError(f"not a {RECORD_FORMAT} record")
  missing = [k for k in ("id", "kind", "config", "nbytes", "leaves") if k not in rec]
  if missing:
    raise ValueError(f"lacks {', '.join(missing)}")
  return rec
