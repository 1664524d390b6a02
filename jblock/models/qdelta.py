"""Compressed weight deltas: a full fine-tune's `W_ft - W_base`, a few bits per weight.

A delta kernel Δ [in, out] (jblock's kernel orientation) is stored in one of three encodings:

  bitdelta  BitDelta (Liu et al., 2024): sign bits, 8 input rows packed into a byte
            (`bits` uint8 [ceil(in/8), out], bit k of byte i = row 8i+k, 1 = positive) and one
            scale per output column (`scale` float32 [out]); Δ ≈ scale ⊙ sign. The scales start
            at mean |Δ| per column (the L2-optimal value for a sign matrix) and are then
            distilled on calibration text (jblock.convert.delta_distill).
  int4      symmetric 4-bit codes in groups of GROUP input rows: `codes` uint8
            [ceil(in/2), out] (two codes per byte, stored +8: byte i holds row i in its low
            nibble and row i + ceil(in/2) in its high one, so decoding is a concatenation)
            and `scale` float16 [ceil(in/GROUP), out] (absmax / 7 per group).
  int8      the same with int8 `codes` [in_pad, out] and absmax / 127.

Decoding is plain jnp, so one function serves conversion (numpy in, numpy out), distillation
(differentiable in the scales) and serving, where it runs inside the fused segment call on
the packed bytes a row's slot holds (jblock.models.deltas): what a decode step reads is the
packed delta, never a dense copy.
"""

import jax.numpy as jnp
import numpy as np

BITDELTA, INT4, INT8 = "bitdelta", "int4", "int8"
METHODS = (BITDELTA, INT4, INT8)  # smallest first
GROUP = 64  # input rows per int4/int8 scale
_QMAX = {INT4: 7, INT8: 127}


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  pad = -x.shape[0] % multiple
  return np.pad(x, ((0, pad), (0, 0))) if pad else x


def group_size(d_in: int) -> int:
  return min(GROUP, d_in)


def encode(method: str, delta: np.ndarray) -> dict[str, np.ndarray]:
  """Δ [in, out] float -> the encoding's arrays (see the module docstring)."""
  delta = np.asarray(delta, np.float32)
  if delta.ndim != 2:
    raise ValueError(f"a delta kernel is [in, out], got shape {delta.shape}")
  if method == BITDELTA:
    signs = _pad_rows(delta >= 0, 8)
    bits = np.packbits(signs, axis=0, bitorder="little")
    return {"bits": bits, "scale": np.mean(np.abs(delta), axis=0).astype(np.float32)}
  if method in _QMAX:
    g = group_size(delta.shape[0])
    padded = _pad_rows(delta, g)
    groups = padded.reshape(-1, g, padded.shape[1])
    absmax = np.max(np.abs(groups), axis=1)
    scale = (absmax / _QMAX[method]).astype(np.float16)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)
    q = np.clip(np.rint(groups / safe[:, None, :]), -_QMAX[method], _QMAX[method])
    q = q.reshape(padded.shape).astype(np.int8)
    if method == INT8:
      return {"codes": q, "scale": scale}
    nib = (_pad_rows(q, 2).astype(np.int16) + 8).astype(np.uint8)
    half = nib.shape[0] // 2
    return {"codes": (nib[:half] | (nib[half:] << 4)).astype(np.uint8), "scale": scale}
  raise ValueError(f"unknown delta encoding {method!r}; one of {', '.join(METHODS)}")


def layout(method: str, d_in: int, d_out: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """The encoding's arrays of a [d_in, d_out] delta: name -> (shape, dtype), as encode makes them."""
  if method == BITDELTA:
    return {"bits": ((-(-d_in // 8), d_out), np.dtype(np.uint8)),
            "scale": ((d_out,), np.dtype(np.float32))}
  if method not in _QMAX:
    raise ValueError(f"unknown delta encoding {method!r}; one of {', '.join(METHODS)}")
  g = group_size(d_in)
  rows = -(-d_in // g) * g
  codes = ((rows, d_out), np.dtype(np.int8)) if method == INT8 else (
      ((rows + 1) // 2, d_out), np.dtype(np.uint8))
  return {"codes": codes, "scale": ((rows // g, d_out), np.dtype(np.float16))}


def decode(method: str, arrays, d_in: int, dtype=jnp.float32):
  """The encoding's arrays -> Δ [..., in, out] in `dtype`. Leading dims (bank slots, rows) are
  kept: the same code decodes one stored delta and a batch of gathered slots."""
  if method == BITDELTA:
    bits, scale = arrays["bits"], arrays["scale"]
    shifts = jnp.arange(8, dtype=jnp.uint8)[:, None]
    unpacked = (bits[..., :, None, :] >> shifts) & 1  # [..., in/8, 8, out]
    signs = unpacked.reshape(*bits.shape[:-2], -1, bits.shape[-1])[..., :d_in, :]
    signs = signs.astype(dtype) * 2 - 1
    return signs * scale[..., None, :].astype(dtype)
  codes, scale = arrays["codes"], arrays["scale"]
  if method == INT4:
    lo = (codes & 15).astype(jnp.int8) - 8
    hi = (codes >> 4).astype(jnp.int8) - 8
    codes = jnp.concatenate([lo, hi], axis=-2)
  elif method != INT8:
    raise ValueError(f"unknown delta encoding {method!r}")
  g = group_size(d_in)
  n_groups = scale.shape[-2]
  codes = codes[..., :n_groups * g, :].reshape(*codes.shape[:-2], n_groups, g, codes.shape[-1])
  values = codes.astype(dtype) * scale[..., :, None, :].astype(dtype)
  return values.reshape(*values.shape[:-3], n_groups * g, values.shape[-1])[..., :d_in, :]


def rows(method: str, arrays, slots, ids, dtype=jnp.float32):
  """Rows `ids` [N] of the deltas of bank slots `slots` [N] (arrays with a leading slot dim):
  decode(...)[slots, ids] [N, out], read as a few packed bytes per row (an embedding table's
  delta is gathered per token, never decoded whole). A row's group is ids // GROUP in every
  case: a table shorter than GROUP has one group."""
  if method == BITDELTA:
    byte = arrays["bits"][slots, ids // 8]  # [N, out]
    sign = ((byte >> (ids % 8).astype(jnp.uint8)[:, None]) & 1).astype(dtype) * 2 - 1
    return sign * arrays["scale"][slots].astype(dtype)
  codes, scale = arrays["codes"], arrays["scale"]
  if method == INT4:
    half = codes.shape[-2]
    low = ids < half
    byte = codes[slots, jnp.where(low, ids, ids - half)]
    q = jnp.where(low[:, None], byte & 15, byte >> 4).astype(jnp.int8) - 8
  elif method == INT8:
    q = codes[slots, ids]
  else:
    raise ValueError(f"unknown delta encoding {method!r}")
  return q.astype(dtype) * scale[slots, ids // GROUP].astype(dtype)


def planes(method: str, arrays, d_in: int, dtype=jnp.float32) -> list[tuple[int, object]]:
  """One stored delta (no leading dims) as dense pieces (first input row, [rows, out]) whose
  products with the matching columns of x sum to x @ decode(...). int4 gives its two nibble
  planes apart, never concatenated: XLA:CPU ran that concatenation 5x slower inside the
  serving loop's body (jblock.models.deltas)."""
  if method != INT4:
    return [(0, decode(method, arrays, d_in, dtype))]
  codes, scale = arrays["codes"], arrays["scale"]
  half = codes.shape[-2]
  scale_rows = jnp.repeat(scale.astype(dtype), group_size(d_in), axis=-2)  # [rows, out]
  scale_rows = jnp.pad(scale_rows, ((0, 2 * half - scale_rows.shape[0]), (0, 0)))
  lo = ((codes & 15).astype(jnp.int8) - 8).astype(dtype) * scale_rows[:half]
  hi = ((codes >> 4).astype(jnp.int8) - 8).astype(dtype) * scale_rows[half:]
  return [(0, lo[:min(half, d_in)]), (half, hi[:max(0, d_in - half)])]


def product(pieces: list[tuple[int, object]], x):
  """x [..., in] @ the delta given as planes()."""
  out = 0
  for start, dense in pieces:
    if dense.shape[0]:
      out = out + x[..., start:start + dense.shape[0]] @ dense
  return out


def decode_np(method: str, arrays: dict[str, np.ndarray], d_in: int) -> np.ndarray:
  """decode() on host arrays, as float32 numpy."""
  return np.asarray(decode(method, {k: jnp.asarray(v) for k, v in arrays.items()}, d_in))


def nbytes(arrays: dict[str, np.ndarray]) -> int:
  return sum(int(np.asarray(a).nbytes) for a in arrays.values())
