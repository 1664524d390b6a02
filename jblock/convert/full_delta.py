"""A full fine-tune's block as a compressed delta block over its base's block.

A *qdelta* block holds, for every leaf of the fine-tune's block that differs from the base's,
what the serving bank adds per row (jblock.models.deltas):
  matrices             `layer_{i}/<target>/<method>/{bits|codes, scale}` (a layers block's
                       projections), `embedding/<method>/..` (an embed block's table,
                       gathered per token; a changed learned position table keeps the block
                       whole), `lm_head/<method>/..` (an untied head): the delta
                       W_ft - W_base encoded by jblock.models.qdelta (bitdelta, int4 or int8);
  small leaves         `<module>/<leaf>/value`, the delta stored whole in float32 (projection
                       biases, norm scales and biases: a few KB per block).
Its config names the base block (`base`), the encoding (`method`) and each kernel's input width
(`inputs`: path -> in). Content-hashed like any block, so the same fine-tune converted twice
writes nothing. Blocks the family's layers do not route through the bank (mixture-of-experts
MLPs, say) raise UnsupportedDeltaError: the conversion stores them whole instead.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS, Block, flat_leaves
from jblock.errors import ConversionError
from jblock.models import deltas, qdelta
from jblock.models.lora import TARGETS

QDELTA = "qdelta"  # the delta block kind
NORMS = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "attn/q_norm", "attn/k_norm")
_NORM_LEAVES = ("scale", "bias")


class UnsupportedDeltaError(ConversionError):
  """A block whose leaves the per-row bank cannot express (stored whole instead)."""


def _role(kind: str, path: str) -> tuple[str, str, str]:
  """'layer_0/attn/q/kernel' -> ('kernel', 'layer_0/attn/q', 'kernel'); raises for leaves the
  bank has no place for. An embed block's tables and a head's `lm_head` are kernels whose
  entry is the leaf itself (deltas.kernel_leaf); the head's norm is a small leaf."""
  if kind == EMBED and path in deltas.TABLES:
    return "kernel", path, path
  if kind == HEAD:
    if path == "lm_head":
      return "kernel", path, path
    module, _, leaf = path.rpartition("/")
    if module == "norm" and leaf in _NORM_LEAVES:
      return "leaf", module, leaf
    raise UnsupportedDeltaError(f"leaf {path}: no per-row delta for it in a head block")
  layer, _, rest = path.partition("/")
  module, _, leaf = rest.rpartition("/")
  if kind != LAYERS or not layer.startswith("layer_") or not module:
    raise UnsupportedDeltaError(f"leaf {path}: not a decoder layer's")
  entry = f"{layer}/{module}"
  if module in TARGETS and leaf == "kernel":
    return "kernel", entry, leaf
  if module in TARGETS and leaf == "bias":
    return "leaf", entry, leaf
  if module in NORMS and leaf in _NORM_LEAVES:
    return "leaf", entry, leaf
  raise UnsupportedDeltaError(f"leaf {path}: no per-row delta for it (e.g. a mixture-of-experts "
                              "MLP)")


def _set(tree: dict[str, Any], path: str, value) -> None:
  *parents, name = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[name] = value


def check_compatible(base: Block, ft: Block, where: str) -> None:
  """Same kind, config and leaf shapes; otherwise a ConversionError naming the tensor."""
  if base.kind != ft.kind:
    raise ConversionError(f"{where}: the fine-tune has a {ft.kind} block, the base a {base.kind}")
  if base.config != ft.config:
    keys = sorted(k for k in set(base.config) | set(ft.config)
                  if base.config.get(k) != ft.config.get(k) and k != "tied_to")
    if keys:
      raise ConversionError(f"{where}: config differs from the base's in {', '.join(keys)}")
  b_leaves, f_leaves = dict(flat_leaves(base.params)), dict(flat_leaves(ft.params))
  for path in sorted(set(b_leaves) | set(f_leaves)):
    if path not in b_leaves or path not in f_leaves:
      side = "base" if path not in b_leaves else "fine-tune"
      raise ConversionError(f"{where}: tensor {path} is missing from the {side}")
    if np.shape(b_leaves[path]) != np.shape(f_leaves[path]):
      raise ConversionError(f"{where}: tensor {path} has shape {list(np.shape(f_leaves[path]))} "
                            f"in the fine-tune, {list(np.shape(b_leaves[path]))} in the base")


def compress(base: Block, base_id: str, ft: Block, method: str) -> Block:
  """The fine-tune's block `ft` as a qdelta block over `base` (id `base_id`). A tied head (its
  table is the embed block's) raises UnsupportedDeltaError: the conversion stores a tied model's
  embed and head whole."""
  if base.kind not in (EMBED, LAYERS, HEAD):
    raise UnsupportedDeltaError(f"a {base.kind} block is stored whole")
  if base.kind == HEAD and (base.config.get("tied_to") or ft.config.get("tied_to")):
    raise UnsupportedDeltaError("a tied head is stored whole")
  if method not in qdelta.METHODS:
    raise ValueError(f"unknown delta encoding {method!r}; one of {', '.join(qdelta.METHODS)}")
  b_leaves = dict(flat_leaves(base.params))
  params: dict[str, Any] = {}
  inputs: dict[str, int] = {}
  for path, ft_value in flat_leaves(ft.params):
    b, f = np.asarray(b_leaves[path], np.float32), np.asarray(ft_value, np.float32)
    if np.array_equal(b, f):
      continue
    role, entry, leaf = _role(base.kind, path)
    if role == "kernel":
      inputs[entry] = int(b.shape[0])
      for key, arr in qdelta.encode(method, f - b).items():
        _set(params, f"{entry}/{method}/{key}", arr)
    else:
      _set(params, f"{entry}/{leaf}/value", f - b)
  return Block(QDELTA, {"base": base_id, "method": method, "inputs": inputs}, params)


def kernel_deltas(delta: Block) -> dict[str, tuple[str, dict[str, Any]]]:
  """path -> (encoding, its arrays) for every compressed kernel of a qdelta block."""
  out = {}
  for entry, d_in in delta.config["inputs"].items():
    node = delta.params
    for p in entry.split("/"):
      node = node[p]
    method = next(m for m in qdelta.METHODS if m in node)
    out[entry] = (method, node[method])
  return out


def leaf_deltas(delta: Block) -> dict[str, np.ndarray]:
  """'layer_0/attn_norm/scale' -> the whole delta, for every small leaf of a qdelta block."""
  return {path[:-len("/value")]: np.asarray(v) for path, v in flat_leaves(delta.params)
          if path.endswith("/value")}


def bank_factors(delta: Block) -> dict[str, dict[str, Any]]:
  """A qdelta block as one bank slot's content (jblock.models.deltas), numpy: path ->
  {encoding: {arrays, "on"}} for matrices, path -> {leaf: {"value", "on"}} for small leaves."""
  out: dict[str, dict[str, Any]] = {}
  for entry, (method, arrays) in kernel_deltas(delta).items():
    out.setdefault(entry, {})[method] = {**{k: np.asarray(v) for k, v in arrays.items()},
                                         "on": np.int32(1)}
  for path, value in leaf_deltas(delta).items():
    entry, _, leaf = path.rpartition("/")
    out.setdefault(entry, {})[leaf] = {"value": np.asarray(value, np.float32), "on": np.int32(1)}
  return out


def single_bank(delta: Block) -> dict[str, dict[str, Any]]:
  """A one-slot bank holding only `delta`, as jnp arrays with a leading slot dim: what the
  serving bank holds for it, for the reference paths (equivalence, assembly) and tests."""
  return {entry: {key: {k: jnp.asarray(np.asarray(v)[None]) for k, v in part.items()}
                  for key, part in parts.items()}
          for entry, parts in bank_factors(delta).items()}


def materialize(base: Block, delta: Block) -> Block:
  """base + decoded delta: the dense block the compressed one serves (export, measurement)."""
  leaves = {p: np.asarray(v) for p, v in flat_leaves(base.params)}
  for entry, (method, arrays) in kernel_deltas(delta).items():
    kernel = leaves[deltas.kernel_leaf(entry)]
    d = qdelta.decode_np(method, arrays, delta.config["inputs"][entry])
    leaves[deltas.kernel_leaf(entry)] = (kernel.astype(np.float32) + d).astype(kernel.dtype)
  for path, value in leaf_deltas(delta).items():
    leaves[path] = (leaves[path].astype(np.float32) + value).astype(leaves[path].dtype)
  params: dict[str, Any] = {}
  for path, value in leaves.items():
    _set(params, path, value)
  return Block(base.kind, base.config, params)


def with_scales(delta: Block, scales: dict[str, np.ndarray]) -> Block:
  """The qdelta block with new bitdelta scales (path -> [out]), e.g. after distillation."""
  params = {p: v for p, v in flat_leaves(delta.params)}
  for entry, scale in scales.items():
    params[f"{entry}/{qdelta.BITDELTA}/scale"] = np.asarray(scale, np.float32)
  tree: dict[str, Any] = {}
  for path, value in params.items():
    _set(tree, path, value)
  return Block(delta.kind, delta.config, tree)
