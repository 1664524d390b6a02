"""LoRA deltas applied per row from an adapter bank (S-LoRA / Punica style).

A layers block's bank holds, for every projection it has (`layer_{i}/attn/q`, ...,
`layer_{i}/mlp/down`), the factors of the adapters currently resident: `a` [S, R, in] (A
transposed) and `b` [S, R, out] for S bank slots, each zero-padded to the bank's max rank R, with the adapter's
scaling already folded into `b`. One batch mixes rows of many adapters: row r adds
`(x_r · a[s_r]) · b[s_r]` to the base projection, where s_r = meta["adapter"][r]; s_r = -1 is
exactly the base (the delta is selected away, not added as zeros).

Bank column c = s·R + j is rank component j of slot s: row c of both `a` and `b` viewed as
[S·R, in] and [S·R, out], so a column is one contiguous row in either (gathering columns copies
whole rows, several times cheaper on CPU than gathering strided columns of an [in, S·R]). The host
knows which slots a batch uses and their ranks, so it sends the batch's columns
(`meta["lora_cols"]`, int32 [C], padded with -1 to a power-of-two bucket): the delta gathers
those C columns of `a` and rows of `b` and runs two dense matmuls over them, each row masked to
its own slot's columns (Punica's SGMV packed into one segment). The cost follows the ranks of the
adapters in the batch, not S·R (a decode step is memory-bound: it reads each of those columns
once); a prompt chunk (several tokens per row, compute-bound) instead multiplies each row by its
own slot's factors only; C is static per bucket, so a few compiled shapes serve every mix.
Without `lora_cols`, or when it names at least half the bank (a gather would copy about as much
as it saves), every column is used; columns past a slot's rank are zeros.

Blocks see the bank through their `meta`: `meta["lora"]` (path -> {"a", "b"}) and
`meta["adapter"]` (int32 [B]), optionally `meta["lora_cols"]`, selected per projection by
jblock.models.deltas (which also applies compressed full-fine-tune deltas from the same bank).
Without `meta["lora"]` the projections compile to what they were without LoRA.
"""

from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
  from jblock.blocks import Block

ATTN_TARGETS = ("attn/q", "attn/k", "attn/v", "attn/o")
MLP_TARGETS = ("mlp/gate", "mlp/up", "mlp/down", "mlp/fc", "mlp/proj")
TARGETS = ATTN_TARGETS + MLP_TARGETS

# (a [S, R, in], b [S, R, out], slot per row [B], bank columns [C] or None = all)
Lora = tuple[Any, Any, Any, Any]


def delta(x, a, b, slots, cols=None):
  """Per-row low-rank update: x [B, T, in] -> [B, T, out] = (x · a[slot]ᵀ) · b[slot].

  Only bank columns `cols` (slot·R + j; -1 = padding) are computed; a row keeps the columns of
  its own slot."""
  s, r, d_in = a.shape
  if x.shape[1] > 1:
    # A prompt chunk is compute-bound: each row multiplies only its own slot's factors (work in
    # proportion to the rows, as Punica's BGMV), where the column form below would multiply
    # every row by every adapter's columns in the batch (3x slower at 12 adapters in 16 rows).
    own = jnp.maximum(slots, 0)  # slot -1 rows are selected away by apply()
    a_rows = jnp.take(a, own, axis=0, mode="clip")  # [B, R, in]
    b_rows = jnp.take(b, own, axis=0, mode="clip")  # [B, R, out]
    h = jnp.einsum("btd,brd->btr", x.astype(a.dtype), a_rows)
    return jnp.einsum("btr,bro->bto", h, b_rows)
  a2, b2 = a.reshape(s * r, d_in), b.reshape(s * r, b.shape[-1])
  if cols is None or 2 * cols.shape[0] >= s * r:  # most columns: reading all beats gathering
    col_slot = jnp.arange(s * r, dtype=slots.dtype) // r
  else:
    safe = jnp.maximum(cols, 0)  # padding reads column 0 (cached), masked below
    # "clip": every index is in range (the host builds them; a worker validates them), and a
    # clipping gather skips the fill-mode's bounds select (about a third of the op on CPU).
    a2 = jnp.take(a2, safe, axis=0, mode="clip")
    b2 = jnp.take(b2, safe, axis=0, mode="clip")
    col_slot = jnp.where(cols >= 0, cols // r, -2).astype(slots.dtype)  # -2: no row's slot
  h = jnp.einsum("btd,cd->btc", x.astype(a.dtype), a2)
  own = (slots[:, None] == col_slot[None, :]).astype(h.dtype)  # [B, C]
  return (h * own[:, None, :]) @ b2


def apply(x, y, lora: Lora):
  """y (the base projection of x) plus each row's delta; rows with slot -1 get y unchanged."""
  a, b, slots, cols = lora
  d = delta(x, a, b, slots, cols).astype(y.dtype)
  return jnp.where((slots >= 0)[:, None, None], y + d, y)


def single_bank(delta: "Block", slot_dtype=jnp.float32) -> dict[str, dict[str, Any]]:
  """A one-slot bank holding only `delta` (a "lora" delta block) at its own rank, for the
  reference paths (jblock.zoo.equivalence) and tests: slot 0 of `meta["lora"]`."""
  bank = {}
  for path, rank in delta.config["ranks"].items():
    node = delta.params
    for p in path.split("/"):
      node = node[p]
    scale = np.float32(delta.config["scaling"][path])
    bank[path] = {"a": jnp.asarray(np.asarray(node["a"], np.float32).T[None], slot_dtype),
                  "b": jnp.asarray((np.asarray(node["b"], np.float32) * scale)[None], slot_dtype)}
  return bank
