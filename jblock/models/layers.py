"""Flax NNX building blocks: norms, projections, RoPE, attention over a paged KV cache, MLPs.

Numerics follow Hugging Face transformers (norms and softmax in float32, RoPE's rotate-half
convention) so that converted models match it to the last logit.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jblock.models.attention import attend

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

def _param(shape, dtype):
  # Params are always replaced by converted weights; initialise cheaply.
  return nnx.Param(jnp.zeros(shape, dtype))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype):
    self.scale = _param((dim,), dtype)
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...] * xf.astype(x.dtype)


class LayerNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype):
    self.scale = _param((dim,), dtype)
    self.bias = _param((dim,), dtype)
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(kind: str, dim: int, eps: float, dtype):
  return RMSNorm(dim, eps, dtype) if kind == "rms" else LayerNorm(dim, eps, dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel is [in, out]."""

  def __init__(self, d_in: int, d_out: int, bias: bool, dtype):
    self.kernel = _param((d_in, d_out), dtype)
    self.bias = _param((d_out,), dtype) if bias else None

  def __call__(self, x):
    y = x @ self.kernel[...]
    return y if self.bias is None else y + self.bias[...]


def rope_inv_freq(rope: dict[str, Any], head_dim: int) -> np.ndarray:
  """Inverse frequencies for rope_type default, linear and llama3 (as transformers computes them)."""
  base = float(rope["rope_theta"])
  inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  inv_freq = inv_freq.astype(np.float32)
  kind = rope.get("rope_type", "default")
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
  return inv_freq


def apply_rope(x, positions, inv_freq):
  """x: [B, T, H, D]; positions: [B, T]. Rotate-half convention of transformers."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class Attention(nnx.Module):
  """Multi-head / grouped-query attention that reads and writes one layer of a paged KV cache."""

  def __init__(self, cfg: dict[str, Any], window: int, dtype):
    d, h, kvh, hd = cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd
    self.q = Linear(d, h * hd, cfg["qkv_bias"], dtype)
    self.k = Linear(d, kvh * hd, cfg["qkv_bias"], dtype)
    self.v = Linear(d, kvh * hd, cfg["qkv_bias"], dtype)
    self.o = Linear(h * hd, d, cfg["o_bias"], dtype)
    self.window = window
    # A tuple keeps it static in the graph definition (not a param).
    self.inv_freq = tuple(rope_inv_freq(cfg["rope"], hd).tolist()) if cfg["rope"] else None

  def __call__(self, x, kv, layer: int, meta):
    """x: [B, T, D]; kv: {"k", "v"} [layers, pages, page_size, KVH, hd] of the whole block, of
    which this attention owns index `layer` (see jblock.models.attention). Returns y and kv."""
    b, t, _ = x.shape
    h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
    q = self.q(x).reshape(b, t, h, hd)
    k = self.k(x).reshape(b, t, kvh, hd)
    v = self.v(x).reshape(b, t, kvh, hd)
    offsets = jnp.arange(t, dtype=jnp.int32)
    qpos = meta["starts"][:, None] + offsets[None, :]  # [B, T] absolute positions
    if self.inv_freq is not None:
      q, k = apply_rope(q, qpos, self.inv_freq), apply_rope(k, qpos, self.inv_freq)

    out, kv = attend(q, k, v, kv, layer, meta, scale=1.0 / math.sqrt(hd), window=self.window)
    return self.o(out.reshape(b, t, h * hd)), kv


class MLP(nnx.Module):
  """gated: down(act(gate(x)) * up(x)); plain: proj(act(fc(x)))."""

  def __init__(self, cfg: dict[str, Any], dtype):
    d, f, bias = cfg["hidden_size"], cfg["intermediate_size"], cfg["mlp_bias"]
    self.gated = cfg["mlp"] == "gated"
    self.act = ACTIVATIONS[cfg["activation"]]
    if self.gated:
      self.gate = Linear(d, f, bias, dtype)
      self.up = Linear(d, f, bias, dtype)
      self.down = Linear(f, d, bias, dtype)
    else:
      self.fc = Linear(d, f, bias, dtype)
      self.proj = Linear(f, d, bias, dtype)

  def __call__(self, x):
    if self.gated:
      return self.down(self.act(self.gate(x)) * self.up(x))
    return self.proj(self.act(self.fc(x)))


class DecoderLayer(nnx.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: dict[str, Any], window: int, dtype):
    d, eps = cfg["hidden_size"], cfg["norm_eps"]
    self.attn_norm = make_norm(cfg["norm"], d, eps, dtype)
    self.attn = Attention(cfg, window, dtype)
    self.mlp_norm = make_norm(cfg["norm"], d, eps, dtype)
    self.mlp = MLP(cfg, dtype)

  def __call__(self, x, kv, layer: int, meta):
    a, kv = self.attn(self.attn_norm(x), kv, layer, meta)
    x = x + a
    return x + self.mlp(self.mlp_norm(x)), kv
