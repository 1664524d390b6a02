"""Rotary position embeddings: every RoPE scaling transformers ships, computed as it computes them.

A RoPE config (hashed into the layers block) is a JSON dict: `rope_type`, `rope_theta`, the
type's parameters, and `rotary_dim` when only the first part of each head rotates (partial
rotary). Static types (default, linear, llama3, yarn) have one frequency table; `dynamic` (NTK)
and `longrope` pick their frequencies from the sequence length, which transformers takes over
the whole call (max position + 1): a prompt's length for every chunk of its prefill, the length
reached for a decode step. jblock takes it per row, from the step metadata's `rope_len` (the
prompt's length for a prefill chunk) or else `starts + n_valid`, so a row's result does not
depend on its batch-mates nor on how its prompt was chunked.
"""

import dataclasses
import functools
import json
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jblock.errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def rope_from_params(params: dict[str, Any] | None, hf: dict[str, Any], head_dim: int,
                     partial_ok: bool = False) -> dict[str, Any]:
  """RoPE config from one HF `rope_parameters` / `rope_scaling` dict (plus config.json `hf`)."""
  rope = dict(params or {})
  if "type" in rope and "rope_type" not in rope:
    rope["rope_type"] = rope.pop("type")
  rope.setdefault("rope_type", "default")
  rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rope["rope_type"]
  if kind not in ROPE_TYPES:
    raise UnsupportedModelError(
        f"rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
  out: dict[str, Any] = {"rope_type": kind, "rope_theta": float(rope["rope_theta"])}
  partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0)
  dim = int(head_dim * partial)
  if dim != head_dim:
    if not partial_ok:
      raise UnsupportedModelError(
          f"partial_rotary_factor={partial} is supported for Phi3ForCausalLM only")
    out["rotary_dim"] = dim
  max_pos = int(hf.get("max_position_embeddings", 2048))
  orig = int(hf.get("original_max_position_embeddings") or
             rope.get("original_max_position_embeddings") or max_pos)

  def need(key):
    if rope.get(key) is None:
      raise UnsupportedModelError(f"rope_type {kind!r} needs {key!r} in the config")
    return rope[key]

  if kind == "linear":
    out["factor"] = float(need("factor"))
  elif kind == "llama3":
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
      out[key] = float(need(key))
    out["original_max_position_embeddings"] = int(need("original_max_position_embeddings"))
  elif kind == "yarn":
    factor = float(rope.get("factor") or max_pos / orig)
    attention = rope.get("attention_factor")
    if attention is None:
      mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
      attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                   if mscale and mscale_all else _yarn_mscale(factor))
    out.update(factor=factor, original_max_position_embeddings=orig,
               beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
               truncate=bool(rope.get("truncate", True)), attention_factor=float(attention))
  elif kind == "dynamic":
    out.update(factor=float(need("factor")), max_position_embeddings=max_pos)
  elif kind == "longrope":
    factor = float(rope.get("factor") or max_pos / orig)
    attention = rope.get("attention_factor")
    if attention is None:
      attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    short, long = [float(x) for x in need("short_factor")], [float(x) for x in need("long_factor")]
    if len(short) != dim // 2 or len(long) != dim // 2:
      raise UnsupportedModelError(f"longrope short_factor/long_factor need {dim // 2} values each")
    out.update(short_factor=short, long_factor=long, original_max_position_embeddings=orig,
               attention_factor=float(attention))
  return out


def depends_on_length(rope: dict[str, Any] | None) -> bool:
  """Whether a position's rotation depends on the whole sequence's length (then the KV of a
  prefix is not the same in a longer sequence)."""
  return bool(rope) and rope.get("rope_type") in ("dynamic", "longrope")


def rerun_length(rope: dict[str, Any] | None) -> int:
  """The cached length at which a generation runs its whole sequence again (Phi-3 LongRoPE: the
  step that first exceeds the original length switches every position to the long factors);
  0 = never."""
  if not rope or not rope.get("rerun_past_original"):
    return 0
  return int(rope["original_max_position_embeddings"])


def rope_length(meta) -> Any:
  """Per-row sequence length dynamic / longrope scalings take (see the module docstring)."""
  end = meta["starts"] + meta["n_valid"]
  return jnp.maximum(meta["rope_len"], end) if "rope_len" in meta else end


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rotary_dim(rope: dict[str, Any], head_dim: int) -> int:
  return int(rope.get("rotary_dim", head_dim))


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
  return (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _static_table(rope_json: str, head_dim: int) -> np.ndarray:
  """Inverse frequencies [dim / 2] of a static RoPE type."""
  rope = json.loads(rope_json)
  dim = rotary_dim(rope, head_dim)
  kind, base = rope["rope_type"], rope["rope_theta"]
  inv_freq = _base_inv_freq(base, dim)
  if kind == "linear":
    return (inv_freq / np.float32(rope["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  if kind == "yarn":
    factor, orig = rope["factor"], rope["original_max_position_embeddings"]

    def correction_dim(rotations):
      return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope["beta_fast"]), correction_dim(rope["beta_slow"])
    if rope["truncate"]:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001
    pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)
  return inv_freq


def inv_freq(rope: dict[str, Any], head_dim: int, seq_len=None):
  """Inverse frequencies: [dim / 2] for static types; [B, dim / 2] for dynamic / longrope,
  where seq_len [B] is each row's sequence length after this step."""
  kind = rope["rope_type"]
  if kind == "dynamic":
    dim = rotary_dim(rope, head_dim)
    factor, max_pos = rope["factor"], rope["max_position_embeddings"]
    seq = jnp.maximum(seq_len, max_pos).astype(jnp.float32)
    base = rope["rope_theta"] * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exps = jnp.asarray(np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    return 1.0 / (base[:, None] ** exps[None, :])
  if kind == "longrope":
    dim = rotary_dim(rope, head_dim)
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    powers = np.float32(rope["rope_theta"]) ** exps
    short = (1.0 / (np.asarray(rope["short_factor"], np.float32) * powers)).astype(np.float32)
    long = (1.0 / (np.asarray(rope["long_factor"], np.float32) * powers)).astype(np.float32)
    use_long = (seq_len > rope["original_max_position_embeddings"])[:, None]
    return jnp.where(use_long, jnp.asarray(long), jnp.asarray(short))
  return jnp.asarray(_static_table(json.dumps(rope, sort_keys=True), head_dim))


def apply_rope(x, positions, freqs, rot_dim: int, attention_factor: float = 1.0):
  """x: [B, T, H, D]; positions: [B, T]; freqs [D'/2] or [B, D'/2]. Rotates the first rot_dim
  dims of each head (rotate-half convention of transformers); the rest pass through."""
  freqs = jnp.asarray(freqs, jnp.float32)
  if freqs.ndim == 1:
    freqs = freqs[None]
  angles = positions[..., None].astype(jnp.float32) * freqs[:, None, :]  # [B, T, D'/2]
  emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if attention_factor != 1.0:
    cos, sin = cos * attention_factor, sin * attention_factor
  cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
  rot, rest = x[..., :rot_dim], x[..., rot_dim:]
  half = rot_dim // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  out = rot * cos + rotated * sin
  return out if rot_dim == x.shape[-1] else jnp.concatenate([out, rest], axis=-1)


@dataclasses.dataclass(frozen=True)
class Rope:
  """A layer's RoPE: a static (hashable) description, applied to q and k at absolute positions."""
  rope_json: str  # the RoPE config, canonical JSON
  head_dim: int  # width of one attention head
  rot_dim: int  # leading dims of each head that rotate
  attention_factor: float  # cos/sin multiplier (yarn, longrope)

  @classmethod
  def make(cls, rope: dict[str, Any], head_dim: int) -> "Rope":
    return cls(json.dumps(rope, sort_keys=True), head_dim, rotary_dim(rope, head_dim),
               float(rope.get("attention_factor", 1.0)))

  def __call__(self, q, k, positions, seq_len):
    freqs = inv_freq(json.loads(self.rope_json), self.head_dim, seq_len)
    return (apply_rope(q, positions, freqs, self.rot_dim, self.attention_factor),
            apply_rope(k, positions, freqs, self.rot_dim, self.attention_factor))
