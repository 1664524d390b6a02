"""Distilling BitDelta scales: the compressed fine-tune's logits made to follow the original's.

BitDelta (Liu et al., 2024) keeps a delta's sign bits fixed and trains only its scales, one per
output column here, so that the model built from base + scale ⊙ sign matches the fine-tune on
calibration text. The loss is KL(fine-tune ‖ compressed) over every token of the calibration
windows, through the chain's own block functions (what is distilled is what is served). Each
scale is trained as a multiplier of its initial value (mean |Δ| of its column), so one learning
rate suits every matrix whatever its delta's magnitude. Optimiser: optax Adam.
"""

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jblock.blocks import LAYERS, Block
from jblock.convert import full_delta
from jblock.models import blocks as block_fns
from jblock.models import qdelta
from jblock.models.attention import contiguous_meta
from jblock.models.deltas import kernel_leaf
from jblock.models.reference import runtime_params


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  steps: int = 200
  lr: float = 5e-3
  batch_size: int = 16
  seed: int = 0


@dataclasses.dataclass
class DistillResult:
  deltas: dict[int, Block]  # chain position -> the qdelta block with distilled scales
  kl_start: float  # mean KL(fine-tune ‖ compressed) on the windows, before
  kl_end: float  # and after


def _dense_params(base_params, delta: Block, multipliers: dict[str, Any]):
  """base + decoded delta as a params tree of jnp arrays; bitdelta scales x their multipliers."""
  def node_of(tree, path):
    for p in path.split("/"):
      tree = tree[p]
    return tree

  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), base_params)

  def add(path, value):
    *parents, leaf = path.split("/")
    node = node_of(params, "/".join(parents)) if parents else params
    node[leaf] = node[leaf] + value

  for entry, (method, arrays) in full_delta.kernel_deltas(delta).items():
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    if method == qdelta.BITDELTA:
      arrays["scale"] = arrays["scale"] * multipliers[entry]
    add(kernel_leaf(entry), qdelta.decode(method, arrays, delta.config["inputs"][entry]))
  for path, value in full_delta.leaf_deltas(delta).items():
    add(path, jnp.asarray(value, jnp.float32))
  return params


def distill(chain: Sequence[Block], bases: dict[int, Block], deltas: dict[int, Block],
            windows: np.ndarray, cfg: DistillConfig = DistillConfig(),
            progress: Callable[[str], None] | None = None) -> DistillResult:
  """Trains the bitdelta scales of `deltas` (position -> qdelta block over `bases[position]`)
  so that the chain with them follows `chain` (the fine-tune) on `windows` [N, T]."""
  say = progress or (lambda _: None)
  windows = np.asarray(windows, np.int32)
  positions = sorted(deltas)
  fns = [block_fns.apply_fn(b.kind, b.config) for b in chain]
  fixed = [jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), runtime_params(chain, i))
           for i in range(len(chain))]
  bits_of = {p: [e for e, (m, _) in full_delta.kernel_deltas(deltas[p]).items()
                 if m == qdelta.BITDELTA] for p in positions}
  trainable = {str(p): {e: jnp.ones_like(jnp.asarray(
      full_delta.kernel_deltas(deltas[p])[e][1]["scale"])) for e in bits_of[p]} for p in positions}

  def logp_of(params_list, tokens):
    b, t = tokens.shape
    meta = contiguous_meta(b, t, 0, t)
    x = tokens
    for block, fn, p in zip(chain, fns, params_list):
      kv = block_fns.init_kv(block.config, b, t, jnp.float32) if block.kind == LAYERS else {}
      x, _ = fn(p, kv, x, meta)
    return jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)

  def chain_params(mult):
    out = list(fixed)
    for p in positions:
      out[p] = _dense_params(bases[p].params, deltas[p], mult[str(p)])
    return out

  def kl(mult, tokens, ref):
    logp = logp_of(chain_params(mult), tokens)
    return jnp.mean(jnp.sum(jnp.exp(ref) * (ref - logp), axis=-1))

  ref_fn = jax.jit(lambda tokens: logp_of(fixed, tokens))
  opt = optax.adam(cfg.lr)
  state = opt.init(trainable)

  @jax.jit
  def step(mult, state, tokens, ref):
    loss, grads = jax.value_and_grad(kl)(mult, tokens, ref)
    updates, state = opt.update(grads, state, mult)
    return optax.apply_updates(mult, updates), state, loss

  eval_kl = jax.jit(kl)
  eval_tokens = windows[:cfg.batch_size]
  eval_ref = ref_fn(eval_tokens)
  kl_start = float(eval_kl(trainable, eval_tokens, eval_ref))
  if any(bits_of.values()):
    rng = np.random.default_rng(cfg.seed)
    report_every = max(1, cfg.steps // 5)
    for n in range(cfg.steps):
      tokens = windows[rng.integers(0, windows.shape[0], size=min(cfg.batch_size, windows.shape[0]))]
      trainable, state, loss = step(trainable, state, tokens, ref_fn(tokens))
      if (n + 1) % report_every == 0 or n + 1 == cfg.steps:
        say(f"  distilling scales: step {n + 1}/{cfg.steps}, KL {float(loss):.5f}")
  kl_end = float(eval_kl(trainable, eval_tokens, eval_ref))
  out = {}
  for p in positions:
    scales = {e: np.asarray(full_delta.kernel_deltas(deltas[p])[e][1]["scale"], np.float32)
              * np.asarray(trainable[str(p)][e], np.float32) for e in bits_of[p]}
    out[p] = full_delta.with_scales(deltas[p], scales) if scales else deltas[p]
  return DistillResult(out, kl_start, kl_end)


__all__ = ["DistillConfig", "DistillResult", "distill"]
