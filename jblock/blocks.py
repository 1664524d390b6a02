"""Blocks: the unit jblock stores, shares, loads and runs.

A model is a chain of blocks: one `embed`, ceil(L / k) `layers` blocks of k decoder layers,
one `head`. A block is its kind, the compute config that changes its math, and a params
pytree (nested dicts of arrays).
"""

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

EMBED, LAYERS, HEAD = "embed", "layers", "head"
KINDS = (EMBED, LAYERS, HEAD)

# Bump when the hashing scheme itself changes: ids from different schemes must never collide.
HASH_SCHEME = "jblock-block-v1"


@dataclasses.dataclass
class Block:
  kind: str  # one of KINDS
  config: dict[str, Any]  # JSON-able compute config; every key changes the block's math
  params: dict[str, Any]  # nested dict: name -> dict | array

  @property
  def nbytes(self) -> int:
    return sum(int(np.asarray(a).nbytes) for _, a in flat_leaves(self.params))

  @property
  def id(self) -> str:
    # Hashes every byte on each call: read it once and keep it (manifests store the ids).
    return block_id(self.kind, self.config, self.params)


def flat_leaves(params: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  """Leaves in canonical order: '/'-joined paths, sorted by path."""
  out = []
  for key in sorted(params):
    if "/" in key:
      raise ValueError(f"param name {key!r} contains '/'")
    value = params[key]
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict):
      out.extend(flat_leaves(value, path))
    else:
      out.append((path, value))
  return out


def block_id(kind: str, config: dict[str, Any], params: dict[str, Any]) -> str:
  """sha256 over (scheme, kind, canonical JSON config, every leaf's path, dtype, shape, bytes).

  Leaves are taken in sorted-path order and their bytes little-endian and C-contiguous, so
  the id is stable across processes, machines and runs. Two blocks with one id compute the
  same function, so they are stored, loaded, compiled and batched once.
  """
  h = hashlib.sha256()

  def put(b: bytes):
    h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no ambiguity between fields
    h.update(b)

  put(HASH_SCHEME.encode())
  put(kind.encode())
  put(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
  for path, leaf in flat_leaves(params):
    arr = np.asarray(leaf)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    arr = np.ascontiguousarray(arr, dtype=dtype)
    put(path.encode())
    put(str(arr.dtype).encode())
    put(json.dumps(list(arr.shape)).encode())
    put(arr.tobytes())
  return h.hexdigest()
