"""Flax NNX building blocks: norms, projections, attention over a paged KV cache, MLPs.

Numerics follow Hugging Face transformers (norms and softmax in float32, RoPE's rotate-half
convention) so that converted models match it to the last logit.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jblock.models import deltas
from jblock.models.attention import attend
from jblock.models.rope import Rope, rope_length

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

  def __call__(self, x, sel=None):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return deltas.row_param(self.scale[...], sel, "scale", x) * xf.astype(x.dtype)


class LayerNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype):
    self.scale = _param((dim,), dtype)
    self.bias = _param((dim,), dtype)
    self.eps = eps

  def __call__(self, x, sel=None):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    scale = deltas.row_param(self.scale[...], sel, "scale", x).astype(jnp.float32)
    bias = deltas.row_param(self.bias[...], sel, "bias", x).astype(jnp.float32)
    return (y * scale + bias).astype(x.dtype)


class GemmaRMSNorm(nnx.Module):
  """RMSNorm scaled by (1 + w), the product taken in float32 before the cast (Gemma 2/3)."""

  def __init__(self, dim: int, eps: float, dtype):
    self.scale = _param((dim,), dtype)
    self.eps = eps

  def __call__(self, x, sel=None):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = deltas.row_param(self.scale[...], sel, "scale", x).astype(jnp.float32)
    return (xf * (1.0 + scale)).astype(x.dtype)


NORMS = {"rms": RMSNorm, "layer": LayerNorm, "gemma_rms": GemmaRMSNorm}


def make_norm(kind: str, dim: int, eps: float, dtype):
  return NORMS[kind](dim, eps, dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel is [in, out]."""

  def __init__(self, d_in: int, d_out: int, bias: bool, dtype):
    self.kernel = _param((d_in, d_out), dtype)
    self.bias = _param((d_out,), dtype) if bias else None

  def __call__(self, x, sel=None):
    """sel: the projection's per-row deltas (jblock.models.deltas), or None."""
    y = x @ self.kernel[...]
    y = y if self.bias is None else y + self.bias[...]
    return y if sel is None else deltas.apply(x, y, sel)


class Attention(nnx.Module):
  """Multi-head / grouped-query attention that reads and writes one layer of a paged KV cache.

  Config switches: `qk_norm` (a norm over each head's q and k before RoPE: Qwen3, Gemma 3),
  `query_pre_attn_scalar` (scale = its -1/2 power: Gemma), `attn_softcap` (logits soft-capped),
  `local_rope` (the RoPE of sliding-window layers: Gemma 3).
  """

  def __init__(self, cfg: dict[str, Any], window: int, dtype):
    d, h, kvh, hd = cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd
    self.q = Linear(d, h * hd, cfg["qkv_bias"], dtype)
    self.k = Linear(d, kvh * hd, cfg["qkv_bias"], dtype)
    self.v = Linear(d, kvh * hd, cfg["qkv_bias"], dtype)
    self.o = Linear(h * hd, d, cfg["o_bias"], dtype)
    if cfg.get("qk_norm"):
      self.q_norm = make_norm(cfg["norm"], hd, cfg["norm_eps"], dtype)
      self.k_norm = make_norm(cfg["norm"], hd, cfg["norm_eps"], dtype)
    else:
      self.q_norm = self.k_norm = None
    self.window = window
    scalar = cfg.get("query_pre_attn_scalar")
    self.scale = scalar ** -0.5 if scalar else 1.0 / math.sqrt(hd)
    self.softcap = float(cfg.get("attn_softcap", 0.0))
    rope = cfg.get("local_rope") if window and cfg.get("local_rope") else cfg["rope"]
    self.rope = Rope.make(rope, hd) if rope else None  # static, part of the graph definition

  def __call__(self, x, kv, layer: int, meta):
    """x: [B, T, D]; kv: {"k", "v"} [layers, pages, page_size, KVH, hd] of the whole block, of
    which this attention owns index `layer` (see jblock.models.attention). Returns y and kv."""
    b, t, _ = x.shape
    h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
    lo = lambda name: deltas.select(meta, layer, name)  # None without an adapter bank
    q = self.q(x, lo("attn/q")).reshape(b, t, h, hd)
    k = self.k(x, lo("attn/k")).reshape(b, t, kvh, hd)
    v = self.v(x, lo("attn/v")).reshape(b, t, kvh, hd)
    if self.q_norm is not None:
      q, k = self.q_norm(q, lo("attn/q_norm")), self.k_norm(k, lo("attn/k_norm"))
    offsets = jnp.arange(t, dtype=jnp.int32)
    qpos = meta["starts"][:, None] + offsets[None, :]  # [B, T] absolute positions
    if self.rope is not None:
      q, k = self.rope(q, k, qpos, rope_length(meta))

    out, kv = attend(q, k, v, kv, layer, meta, scale=self.scale, window=self.window,
                     softcap=self.softcap)
    return self.o(out.reshape(b, t, h * hd), lo("attn/o")), kv


class MLP(nnx.Module):
  """gated: down(act(gate(x)) * up(x)); plain: proj(act(fc(x)))."""

  def __init__(self, cfg: dict[str, Any], dtype, intermediate_size: int = 0):
    d, bias = cfg["hidden_size"], cfg["mlp_bias"]
    f = intermediate_size or cfg["intermediate_size"]
    self.gated = cfg["mlp"] == "gated"
    self.act = ACTIVATIONS[cfg["activation"]]
    if self.gated:
      self.gate = Linear(d, f, bias, dtype)
      self.up = Linear(d, f, bias, dtype)
      self.down = Linear(f, d, bias, dtype)
    else:
      self.fc = Linear(d, f, bias, dtype)
      self.proj = Linear(f, d, bias, dtype)

  def __call__(self, x, sel=None):
    lo = (sel or {}).get
    if self.gated:
      return self.down(self.act(self.gate(x, lo("gate"))) * self.up(x, lo("up")), lo("down"))
    return self.proj(self.act(self.fc(x, lo("fc"))), lo("proj"))


class DecoderLayer(nnx.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)).

  `sandwich_norm` (Gemma 2/3) also norms each sub-layer's output before the residual add;
  `mlp` replaces the dense MLP (a mixture of experts: jblock.models.moe).
  """

  def __init__(self, cfg: dict[str, Any], window: int, dtype, mlp: nnx.Module | None = None):
    d, eps = cfg["hidden_size"], cfg["norm_eps"]
    self.attn_norm = make_norm(cfg["norm"], d, eps, dtype)
    self.attn = Attention(cfg, window, dtype)
    self.mlp_norm = make_norm(cfg["norm"], d, eps, dtype)
    self.mlp = mlp if mlp is not None else MLP(cfg, dtype)
    if cfg.get("sandwich_norm"):
      self.post_attn_norm = make_norm(cfg["norm"], d, eps, dtype)
      self.post_mlp_norm = make_norm(cfg["norm"], d, eps, dtype)
    else:
      self.post_attn_norm = self.post_mlp_norm = None

  def __call__(self, x, kv, layer: int, meta):
    lo = lambda name: deltas.select(meta, layer, name)  # per-row deltas, None without a bank
    a, kv = self.attn(self.attn_norm(x, lo("attn_norm")), kv, layer, meta)
    if self.post_attn_norm is not None:
      a = self.post_attn_norm(a, lo("post_attn_norm"))
    x = x + a
    mlp_sel = deltas.select_mlp(meta, layer) if isinstance(self.mlp, MLP) else None
    h = self.mlp_norm(x, lo("mlp_norm"))
    m = self.mlp(h) if mlp_sel is None else self.mlp(h, sel=mlp_sel)
    if self.post_mlp_norm is not None:
      m = self.post_mlp_norm(m, lo("post_mlp_norm"))
    return x + m, kv
