"""The three block kinds as Flax NNX modules, and their pure apply functions.

Every block kind has one contract: `apply(params, kv, x, meta) -> (y, kv)`.
- embed:  x = token ids [B, T] int32            -> hidden [B, T, D]; kv unused ({}).
- layers: x = hidden [B, T, D]                  -> hidden [B, T, D]; kv = {"k", "v"}:
          [layers, pages, KVH, page_size, head_dim], written in place in the rows' pages.
- head:   x = hidden [B, T, D]                  -> logits [B, T, V] float32; kv unused.
`meta` holds per-row int32 arrays: `page_table` [B, W] (the row's KV pages), `starts` (tokens
already cached, i.e. the position of x[:, 0]) and `n_valid` (real tokens in the row; the rest is
padding). See jblock.models.attention.
"""

import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jblock.blocks import EMBED, HEAD, LAYERS
from jblock.models import attention, deltas
from jblock.models.layers import DecoderLayer, make_norm
from jblock.models.moe import MoE


class EmbedBlock(nnx.Module):

  def __init__(self, cfg: dict[str, Any], max_positions: int = 0, dtype=jnp.float32):
    self.embedding = nnx.Param(jnp.zeros((cfg["vocab_size"], cfg["hidden_size"]), dtype))
    self.position_embedding = (nnx.Param(jnp.zeros((max_positions, cfg["hidden_size"]), dtype))
                               if cfg["learned_positions"] else None)
    # Gemma: embeddings times sqrt(hidden), the factor rounded to the table's dtype first.
    self.scale = math.sqrt(cfg["hidden_size"]) if cfg.get("embed_scale") else None

  def __call__(self, tokens, kv, meta):
    y = jnp.take(self.embedding[...], tokens, axis=0, mode="clip")
    # A compressed fine-tune's table delta, per row's bank slot (before Gemma's scale, as the
    # fine-tune's own table would be).
    y = deltas.table_rows(jnp.clip(tokens, 0, self.embedding.shape[0] - 1), y,
                          deltas.select_path(meta, "embedding"))
    if self.scale is not None:
      y = y * jnp.asarray(self.scale, y.dtype)
    if self.position_embedding is not None:
      pos = meta["starts"][:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
      y = y + jnp.take(self.position_embedding[...], pos, axis=0, mode="clip")
    return y, kv


class LayersBlock(nnx.Module):
  """A group of consecutive decoder layers; layer i of the group is attribute `layer_{i}`."""

  def __init__(self, cfg: dict[str, Any], dtype=jnp.float32):
    self.num_layers = cfg["num_layers"]
    moe_layers = cfg.get("moe_layers") or [bool(cfg.get("moe"))] * self.num_layers
    for i, window in enumerate(cfg["sliding_windows"]):
      mlp = MoE(cfg, dtype) if moe_layers[i] else None
      setattr(self, f"layer_{i}", DecoderLayer(cfg, window, dtype, mlp=mlp))

  def __call__(self, x, kv, meta):
    for i in range(self.num_layers):
      x, kv = getattr(self, f"layer_{i}")(x, kv, i, meta)
    return x, kv


class HeadBlock(nnx.Module):
  """Final norm + LM head. Tied: the table is the embed block's, passed in as `embedding`."""

  def __init__(self, cfg: dict[str, Any], dtype=jnp.float32):
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    self.norm = make_norm(cfg["norm"], d, cfg["norm_eps"], dtype)
    self.tied = cfg["tied_to"] is not None
    if self.tied:
      self.embedding = nnx.Param(jnp.zeros((v, d), dtype))
    else:
      self.lm_head = nnx.Param(jnp.zeros((d, v), dtype))  # kernel [D, V]
    self.softcap = float(cfg.get("final_softcap", 0.0))  # Gemma 2: c * tanh(logits / c)

  def __call__(self, x, kv, meta):
    x = self.norm(x, deltas.select_path(meta, "norm"))
    if self.tied:
      logits = jnp.einsum("btd,vd->btv", x, self.embedding[...], preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("btd,dv->btv", x, self.lm_head[...], preferred_element_type=jnp.float32)
      sel = deltas.select_path(meta, "lm_head")  # a compressed fine-tune's head delta, per row
      if sel is not None:
        logits = deltas.apply(x, logits, sel)
    logits = logits.astype(jnp.float32)
    if self.softcap:
      logits = jnp.tanh(logits / self.softcap) * self.softcap
    return logits, kv


@functools.lru_cache(maxsize=None)
def _graphdef(kind: str, config_json: str):
  cfg = json.loads(config_json)
  if kind == EMBED:
    make = lambda: EmbedBlock(cfg, max_positions=1)
  elif kind == LAYERS:
    make = lambda: LayersBlock(cfg)
  elif kind == HEAD:
    make = lambda: HeadBlock(cfg)
  else:
    raise ValueError(f"unknown block kind {kind!r}")
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  return graphdef


def apply_fn(kind: str, config: dict[str, Any]):
  """The block's pure function `(params, kv, x, meta) -> (y, kv)`, ready for jax.jit.

  The NNX module is split once; each trace merges it with the given params, so one compiled
  function serves every block with this kind and config (all variants of a model share it).
  """
  graphdef = _graphdef(kind, json.dumps(config, sort_keys=True))

  def apply(params, kv, x, meta):
    module = nnx.merge(graphdef, _as_params(params))
    return module(x, kv, meta)

  return apply


def _as_params(tree):
  return {k: _as_params(v) if isinstance(v, dict) else nnx.Param(v) for k, v in tree.items()}


def init_kv(config: dict[str, Any], slots: int, max_len: int, dtype,
            page_size: int = attention.DEFAULT_PAGE_SIZE) -> dict[str, jax.Array]:
  """Zeroed paged KV for one layers block with room for `slots` rows of `max_len` tokens laid
  out contiguously (row i owns pages [i * W, (i + 1) * W); see attention.contiguous_page_table)."""
  pages = slots * -(-max_len // page_size)
  return attention.init_kv(config["num_layers"], pages, page_size, config["num_kv_heads"],
                           config["head_dim"], dtype)
