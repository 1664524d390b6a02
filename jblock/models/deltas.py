"""Per-row deltas over a shared base block: LoRA factors and compressed full-fine-tune deltas.

A block's adapter bank (`meta["lora"]`, path -> entry) holds, per bank slot, what the model
resident in that slot adds to the base; `meta["adapter"]` (int32 [B]) is each row's slot, -1 for
the base itself. LoRA banks sit on layers blocks; compressed deltas also on embed and head blocks
(untied), so a compressed fine-tune runs through its base's whole chain. An entry is a dict that
may hold:

  "a", "b"                   LoRA factors (jblock.models.lora), for a projection;
  "bitdelta"/"int4"/"int8"   a compressed kernel delta (jblock.models.qdelta): its arrays with a
                             leading slot dim, plus "on" [S] (1 where the slot's model uses this
                             encoding here);
  "bias", "scale"            whole deltas of a small leaf (a projection's bias, a norm's scale or
                             bias): {"value": [S, dim], "on": [S]}.

Projections are addressed `layer_{i}/attn/q` .. `layer_{i}/mlp/down`, norms `layer_{i}/attn_norm`,
`layer_{i}/mlp_norm`, `layer_{i}/post_attn_norm`, `layer_{i}/post_mlp_norm`, `layer_{i}/attn/q_norm`,
`layer_{i}/attn/k_norm`; in an embed block its table `embedding` (a
compressed [vocab, dim] delta whose rows are gathered per token, not multiplied), in a head
block `lm_head` and `norm`. A row whose slot does not use an entry gets the base's value exactly
(selected, not added as zeros). A compressed delta costs nothing in a batch where no row uses its
encoding (lax.cond); otherwise each slot in use decodes its packed bytes once, inside the fused
call, and multiplies its own rows (the cost model is in the README's "Full fine-tunes").
"""

from typing import Any

import jax
import jax.numpy as jnp

from jblock.models import lora as lora_lib
from jblock.models import qdelta

# (bank entry, slot per row [B], LoRA bank columns [C] or None)
Selection = tuple[dict[str, Any], Any, Any]


TABLES = ("embedding",)  # embed-block leaves whose deltas are row-gathered (learned positions: whole)


def kernel_leaf(entry: str) -> str:
  """The param a compressed entry's delta applies to: 'layer_0/attn/q' -> 'layer_0/attn/q/kernel';
  top-level matrices ('embedding', 'lm_head') are their own leaf."""
  return f"{entry}/kernel" if "/" in entry else entry


def select_path(meta, path: str) -> Selection | None:
  """The bank entry at `path`, or None (no bank, or nothing banked there)."""
  bank = meta.get("lora") if isinstance(meta, dict) else None
  if not bank:
    return None
  entry = bank.get(path)
  if entry is None:
    return None
  return entry, meta["adapter"], meta.get("lora_cols")


def select(meta, layer: int, target: str) -> Selection | None:
  """The bank entry of `layer_{layer}/{target}`, or None."""
  return select_path(meta, f"layer_{layer}/{target}")


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
  """y + each row's decoded delta, grouped by slot. The rows' tokens are sorted by slot; a loop
  over the bank's slots decodes, for each slot some row uses, its packed delta once and
  multiplies only that slot's tokens, a window of `win` tokens at a time. A step thus reads each
  active slot's packed bytes once and writes its dense delta once. Per-row gathers decoded it
  once per row instead (7-21x slower at B=32, hidden 512), and a Python loop over the slots, or a
  switch over window sizes, compiled several times longer (README, "Full fine-tunes")."""
  b, t, d_in = x.shape
  n, n_slots = b * t, enc["on"].shape[0]
  win = min(n, 8 if t == 1 else 32)
  tok_slots = jnp.repeat(jnp.where(_rows_on(enc["on"], slots), slots, n_slots), t)
  order = jnp.argsort(tok_slots, stable=True)
  xs = jnp.concatenate([x.reshape(n, d_in)[order], jnp.zeros((win, d_in), x.dtype)])
  counts = jnp.bincount(tok_slots, length=n_slots + 1)[:n_slots]
  starts = jnp.cumsum(counts) - counts
  packed = {k: v for k, v in enc.items() if k != "on"}

  def slot_term(s, acc):
    def run(acc):
      own = {k: jax.lax.dynamic_index_in_dim(v, s, keepdims=False) for k, v in packed.items()}
      pieces = qdelta.planes(method, own, d_in, x.dtype)

      def window(j, acc):
        at = starts[s] + j * win
        xc = jax.lax.dynamic_slice_in_dim(xs, at, win)
        cur = jax.lax.dynamic_slice_in_dim(acc, at, win)
        mine = (j * win + jnp.arange(win) < counts[s])[:, None]
        new = jnp.where(mine, qdelta.product(pieces, xc).astype(acc.dtype), cur)
        return jax.lax.dynamic_update_slice_in_dim(acc, new, at, 0)

      return jax.lax.fori_loop(0, (counts[s] + win - 1) // win, window, acc)

    return jax.lax.cond(counts[s] > 0, run, lambda a: a, acc)

  acc = jax.lax.fori_loop(0, n_slots, slot_term, jnp.zeros((n + win, y.shape[-1]), y.dtype))
  d = jnp.zeros((n, y.shape[-1]), y.dtype).at[order].set(acc[:n])
  return y + d.reshape(y.shape)


def table_rows(ids, y, sel: Selection | None):
  """y [B, T, D] (rows of a base table at ids [B, T]) plus each row's slot's decoded delta rows
  at the same ids: a gather of a few packed bytes per token, never a decode of the table."""
  if sel is None:
    return y
  entry, slots, _ = sel
  for method in qdelta.METHODS:
    if method in entry:
      enc = entry[method]
      b, t = ids.shape
      tok_slots = jnp.repeat(jnp.maximum(slots, 0), t)
      rows = qdelta.rows(method, {k: v for k, v in enc.items() if k != "on"}, tok_slots,
                         ids.reshape(-1)).reshape(b, t, -1)
      on = _rows_on(enc["on"], slots)[:, None, None]
      y = y + jnp.where(on, rows.astype(y.dtype), jnp.zeros((), y.dtype))
  return y


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
