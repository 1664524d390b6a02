"""LoRA deltas applied per row from an adapter bank (S-LoRA / Punica style).

A layers block's bank holds, for every projection it has (`layer_{i}/attn/q`, ...,
`layer_{i}/mlp/down`), the factors of the adapters currently resident: `a` [in, S, R] and `b`
[S, R, out] for S bank slots, each zero-padded to the bank's max rank R, with the adapter's
scaling already folded into `b`. One batch mixes rows of many adapters: row r adds
`(x_r · a[s_r]) · b[s_r]` to the base projection, where s_r = meta["adapter"][r]; s_r = -1 is
exactly the base (the delta is selected away, not added as zeros).

`a` is laid out [in, S, R]. With few bank columns (S·R) or at least as many rows as slots, the
delta is two dense matmuls over all S·R columns with the other slots' columns masked to zero per
row; otherwise each row's factors are gathered first (Punica's BGMV), which reads R columns per
row instead of S·R. The choice is static (shapes), so it costs nothing at run time.

Blocks see the bank through their `meta`: `meta["lora"]` (path -> {"a", "b"}) and
`meta["adapter"]` (int32 [B]). Without `meta["lora"]` the projections compile to what they
were without LoRA.
"""

from typing import Any

import jax.numpy as jnp

ATTN_TARGETS = ("attn/q", "attn/k", "attn/v", "attn/o")
MLP_TARGETS = ("mlp/gate", "mlp/up", "mlp/down", "mlp/fc", "mlp/proj")
TARGETS = ATTN_TARGETS + MLP_TARGETS

Lora = tuple[Any, Any, Any]  # (a [in, S, R], b [S, R, out], slot per row [B])


def select(meta, layer: int, target: str) -> Lora | None:
  """The bank entry of one projection of layer `layer`, or None (no bank, or no such entry)."""
  bank = meta.get("lora") if isinstance(meta, dict) else None
  if not bank:
    return None
  entry = bank.get(f"layer_{layer}/{target}")
  if entry is None:
    return None
  return entry["a"], entry["b"], meta["adapter"]


def select_mlp(meta, layer: int) -> dict[str, Lora] | None:
  """{"gate": ..., "down": ...} for the layer's MLP projections in the bank, or None."""
  found = {t.split("/")[1]: select(meta, layer, t) for t in MLP_TARGETS}
  found = {k: v for k, v in found.items() if v is not None}
  return found or None


def delta(x, a, b, slots):
  """Per-row low-rank update: x [B, T, in] -> [B, T, out] = (x · a[:, slot]) · b[slot]."""
  d_in, s, r = a.shape
  batch, t, _ = x.shape
  if s > batch and s * r >= 512:  # gathered: R columns per row, not S·R
    safe = jnp.maximum(slots, 0)
    h = jnp.einsum("bti,ibr->btr", x.astype(a.dtype), jnp.take(a, safe, axis=1))
    return jnp.einsum("btr,bro->bto", h, jnp.take(b, safe, axis=0))
  h = (x.astype(a.dtype) @ a.reshape(d_in, s * r)).reshape(batch, t, s, r)
  own = (slots[:, None] == jnp.arange(s, dtype=slots.dtype)[None, :]).astype(h.dtype)  # [B, S]
  h = h * own[:, None, :, None]
  return h.reshape(batch, t, s * r) @ b.reshape(s * r, b.shape[-1])


def apply(x, y, lora: Lora):
  """y (the base projection of x) plus each row's delta; rows with slot -1 get y unchanged."""
  a, b, slots = lora
  d = delta(x, a, b, slots).astype(y.dtype)
  return jnp.where((slots >= 0)[:, None, None], y + d, y)
