"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): router, top-k, routed grouped matmul.

Layer config key `moe` (hashed with the layers block):
  num_experts, top_k   experts per layer, experts per token
  expert_size          each expert's MLP width
  norm_topk_prob       renormalise the k routing weights to sum to 1 (Mixtral: always)
  weights_in_f32       multiply expert outputs by float32 weights (Mixtral) or model-dtype (Qwen)
  shared_size          width of the always-on shared expert, 0 = none (Qwen2-MoE); it is scaled
                       by sigmoid(shared_gate(x))

Params: `router/kernel` [D, E]; `experts/{gate,up,down}` stacked on a leading expert axis
([E, D, F], [E, D, F], [E, F, D]; the zoo stores each expert's slices once, see
jblock.zoo.experts); optional `shared/{gate,up,down}` and `shared_gate/kernel` [D, 1].

Cost follows the routed tokens: the token-expert assignments are sorted by expert and cut into
tiles of `tile` rows that all go to one expert; a scan over the tiles slices each tile's expert
weights and runs dense matmuls (see `tiling`). A decode step of one token with top-2 reads 2
experts, not E; a long prefill computes at most about twice its routed rows, not tokens * E.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jblock.models.layers import ACTIVATIONS, MLP, Linear, _param


MIN_TILE = 16  # rows: below this a tile's matmul is all weight reads anyway


def tiling(assignments: int, num_experts: int) -> tuple[int, int]:
  """(rows per tile, number of tiles) that fit every routing of `assignments` token-expert pairs.

  Expert e's c_e rows take ceil(c_e / tile) tiles, so assignments // tile + (experts used) tiles
  always suffice, computing the routed rows plus at most one tile of padding per used expert.
  Tiles of >= assignments / experts-used rows bound that padding by the routed rows (long
  prefills: <= 2x); tiles of >= MIN_TILE rows keep small (decode) steps at about one weight read
  per used expert.
  """
  used = min(num_experts, assignments)
  tile = max(-(-assignments // used), min(assignments, MIN_TILE))
  return tile, min(assignments, assignments // tile + used)


def routed_experts(x, top_e, top_w, gate, up, down, act):
  """sum_k w[n, k] * expert_{e[n, k]}(x[n]) for x [N, D], top_e/top_w [N, K]; weights [E, ...]
  or tuples of E per-expert arrays."""
  n, d = x.shape
  k = top_e.shape[1]
  num_experts = len(gate) if isinstance(gate, (tuple, list)) else gate.shape[0]
  a = n * k
  tile, tiles = tiling(a, num_experts)
  e = top_e.reshape(a).astype(jnp.int32)
  tok = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
  w = top_w.reshape(a)
  order = jnp.argsort(e, stable=True)
  e_s, tok_s, w_s = e[order], tok[order], w[order]
  counts = jnp.bincount(e, length=num_experts)
  group_start = jnp.cumsum(counts) - counts
  per_expert = (counts + tile - 1) // tile
  tile_end = jnp.cumsum(per_expert)
  rank = jnp.arange(a, dtype=jnp.int32) - group_start[e_s]
  slot = (tile_end[e_s] - per_expert[e_s] + rank // tile) * tile + rank % tile
  slot_tok = jnp.full((tiles * tile,), n, jnp.int32).at[slot].set(tok_s)
  slot_w = jnp.zeros((tiles * tile,), w.dtype).at[slot].set(w_s)
  tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(tiles), side="right"),
                            num_experts - 1)
  xt = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[slot_tok].reshape(tiles, tile, d)

  def one_tile(_, inputs):
    # A dynamic index of one expert's weights per tile: a slice, not a gathered copy of them all.
    rows, j = inputs
    pick = lambda w: jax.lax.dynamic_index_in_dim(w, j, keepdims=False)
    h = act(rows @ pick(gate)) * (rows @ pick(up))
    return None, h @ pick(down)

  if isinstance(gate, (tuple, list)):
    # Experts held one array each (shared between blocks, jblock.runtime.parts): a switch runs
    # only the tile's expert, reading its weights and no other's.
    def branch(e):
      return lambda rows: (act(rows @ gate[e]) * (rows @ up[e])) @ down[e]

    branches = [branch(e) for e in range(num_experts)]
    one_tile = lambda _, inputs: (None, jax.lax.switch(inputs[1], branches, inputs[0]))
  _, y = jax.lax.scan(one_tile, None, (xt, tile_expert))
  y = y.reshape(tiles * tile, d)
  y = (y * slot_w[:, None]).astype(x.dtype)  # padding rows have weight 0
  return jnp.zeros((n + 1, d), x.dtype).at[slot_tok].add(y)[:n]


class Experts(nnx.Module):
  """Every expert's gated MLP weights, stacked on a leading expert axis."""

  def __init__(self, e: int, d: int, f: int, dtype):
    self.gate = _param((e, d, f), dtype)
    self.up = _param((e, d, f), dtype)
    self.down = _param((e, f, d), dtype)


class MoE(nnx.Module):

  def __init__(self, cfg: dict[str, Any], dtype):
    moe = cfg["moe"]
    d, e, f = cfg["hidden_size"], moe["num_experts"], moe["expert_size"]
    self.top_k, self.norm_topk = moe["top_k"], moe["norm_topk_prob"]
    self.weights_in_f32 = moe["weights_in_f32"]
    self.act = ACTIVATIONS[cfg["activation"]]
    self.router = Linear(d, e, False, dtype)
    self.experts = Experts(e, d, f, dtype)
    if moe["shared_size"]:
      self.shared = MLP(cfg, dtype, intermediate_size=moe["shared_size"])
      self.shared_gate = Linear(d, 1, False, dtype)
    else:
      self.shared = self.shared_gate = None

  def __call__(self, x):
    b, t, d = x.shape
    xs = x.reshape(b * t, d)
    # Router logits accumulate and stay in float32: in bfloat16 near-ties would flip experts.
    logits = jnp.dot(xs, self.router.kernel[...], preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_w, top_e = jax.lax.top_k(probs, self.top_k)
    if self.norm_topk:
      top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    if not self.weights_in_f32:
      top_w = top_w.astype(x.dtype)
    ex = self.experts
    # Each weight: stacked [E, ...], or a tuple of E arrays (experts shared across blocks).
    gate, up, down = (w.get_value() for w in (ex.gate, ex.up, ex.down))
    y = routed_experts(xs, top_e, top_w, gate, up, down, self.act)
    if self.shared is not None:
      y = y + jax.nn.sigmoid(self.shared_gate(xs)) * self.shared(xs)
    return y.reshape(b, t, d)
