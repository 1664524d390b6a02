"""Per-row deltas over a shared base block: LoRA factors and compressed full-fine-tune deltas.

A layers block's adapter bank (`meta["lora"]`, path -> entry) holds, per bank slot, what the
model resident in that slot adds to the base; `meta["adapter"]` (int32 [B]) is each row's slot,
-1 for the base itself. An entry is a dict that may hold:

  "a", "b"                   LoRA factors (jblock.models.lora), for a projection;
  "bitdelta"/"int4"/"int8"   a compressed kernel delta (jblock.models.qdelta): its arrays with a
                             leading slot dim, plus "on" [S] (1 where the slot's model uses this
                             encoding here);
  "bias", "scale"            whole deltas of a small leaf (a projection's bias, a norm's scale or
                             bias): {"value": [S, dim], "on": [S]}.

Projections are addressed `layer_{i}/attn/q` .. `layer_{i}/mlp/down`, norms `layer_{i}/attn_norm`,
`layer_{i}/mlp_norm`, `layer_{i}/post_attn_norm`, `layer_{i}/post_mlp_norm`, `layer_{i}/attn/q_norm`,
`layer_{i}/attn/k_norm`. A row whose slot does not use an entry gets the base's value exactly
(selected, not added as zeros). A compressed delta costs nothing in a batch where no row uses its
encoding (lax.cond); otherwise each row gathers its own slot's packed bytes and decodes them in
the fused call, so a decode step reads B x the packed delta, not a dense copy (the cost model is
in the README's "Full fine-tunes").
"""

from typing import Any

import jax
import jax.numpy as jnp

from jblock.models import lora as lora_lib
from jblock.models import qdelta

# (bank entry, slot per row [B], LoRA bank columns [C] or None)
Selection = tuple[dict[str, Any], Any, Any]


def select(meta, layer: int, target: str) -> Selection | None:
  """The bank entry of `layer_{layer}/{target}`, or None (no bank, or nothing banked there)."""
  bank = meta.get("lora") if isinstance(meta, dict) else None
  if not bank:
    return None
  entry = bank.get(f"layer_{layer}/{target}")
  if entry is None:
    return None
  return entry, meta["adapter"], meta.get("lora_cols")


def select_mlp(meta, layer: int) -> dict[str, Selection] | None:
  """{"gate": ..., "down": ...} for the layer's MLP projections in the bank, or None."""
  found = {t.split("/")[1]: select(meta, layer, t) for t in lora_lib.MLP_TARGETS}
  found = {k: v for k, v in found.items() if v is not None}
  return found or None


def _rows_on(on, slots):
  """bool [B]: rows whose slot uses this entry (slot -1 never does)."""
  return (slots >= 0) & (jnp.take(on, jnp.maximum(slots, 0), mode="clip") > 0)


def leaf_delta(leaf: dict[str, Any], slots):
  """A small leaf's per-row delta [B, dim]: its slot's value, zeros where the slot has none."""
  on = _rows_on(leaf["on"], slots)
  value = jnp.take(leaf["value"], jnp.maximum(slots, 0), axis=0, mode="clip")
  return jnp.where(on.reshape((-1,) + (1,) * (value.ndim - 1)), value, jnp.zeros_like(value))


def row_param(value, sel: Selection | None, key: str, x):
  """A norm's param `value` [dim] as each row of x sees it: + the row's whole delta, shaped to
  broadcast over x's middle dims ([B, T, D] or [B, T, H, hd])."""
  if sel is None or key not in sel[0]:
    return value
  d = leaf_delta(sel[0][key], sel[1]).astype(value.dtype)
  return value + d.reshape((d.shape[0],) + (1,) * (x.ndim - 2) + (d.shape[-1],))


def _compressed(x, y, method: str, enc: dict[str, Any], slots):
  active = _rows_on(enc["on"], slots)

  def run(_):
    own = jnp.maximum(slots, 0)
    rows = {k: jnp.take(v, own, axis=0, mode="clip") for k, v in enc.items() if k != "on"}
    delta = qdelta.decode(method, rows, x.shape[-1], x.dtype)  # [B, in, out]
    d = jnp.einsum("btd,bdo->bto", x, delta).astype(y.dtype)
    return jnp.where(active[:, None, None], y + d, y)

  return jax.lax.cond(jnp.any(active), run, lambda _: y, None)


def apply(x, y, sel: Selection):
  """y (the base projection of x) plus each row's deltas from the entry: LoRA, a compressed
  kernel delta, a bias delta. Rows with slot -1 get y unchanged."""
  entry, slots, cols = sel
  if "a" in entry:
    y = lora_lib.apply(x, y, (entry["a"], entry["b"], slots, cols))
  for method in qdelta.METHODS:
    if method in entry:
      y = _compressed(x, y, method, entry[method], slots)
  if "bias" in entry:
    b = leaf_delta(entry["bias"], slots).astype(y.dtype)
    y = y + b[:, None, :]
  return y
