"""Fine-tuning in JAX through the model's own block functions (no torch, no optax).

The loss runs the chain exactly as serving does (`apply_fn` per block, a fresh KV cache per
step), so what is trained is what is served. Only the trainable blocks' params are
differentiated and updated; the others are passed through untouched and stay bit-identical,
which is what lets a partial fine-tune share its frozen blocks with the base by hash.
"""

import dataclasses
import functools
import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS, Block
from jblock.models import blocks as block_fns
from jblock.models.attention import contiguous_meta


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  batch_size: int = 8
  seq_len: int = 32  # tokens per training window
  lr: float = 3e-3
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  clip_norm: float = 1.0  # global gradient-norm clip: keeps tiny models stable at high lr
  warmup: int = 0  # steps of linear learning-rate warm-up
  cosine: bool = False  # cosine-decay the learning rate to 10% over `steps`
  seed: int = 0


@dataclasses.dataclass
class TrainResult:
  blocks: list[Block]  # the new chain: trained blocks replaced, frozen ones the same objects
  trained: list[int]  # chain indices of the blocks that were trained
  loss_start: float  # loss on a fixed evaluation batch before training
  loss_end: float  # the same batch after training
  losses: list[float]  # training loss per step


def trainable_indices(blocks: Sequence[Block], trainable_top_layers: int, full: bool) -> list[int]:
  """Chain indices to train: every block when `full`, else the layers blocks of the top K layers."""
  if full:
    return list(range(len(blocks)))
  layer_blocks = [i for i, b in enumerate(blocks) if b.kind == LAYERS]
  total = sum(blocks[i].config["num_layers"] for i in layer_blocks)
  if not 1 <= trainable_top_layers <= total:
    raise ValueError(f"trainable_top_layers must be in [1, {total}], got {trainable_top_layers}")
  chosen, covered = [], 0
  for i in reversed(layer_blocks):
    if covered >= trainable_top_layers:
      break
    chosen.append(i)
    covered += blocks[i].config["num_layers"]
  if covered != trainable_top_layers:
    raise ValueError(f"the top {trainable_top_layers} layers do not fill whole layers blocks; "
                     f"convert with layers_per_block=1")
  return sorted(chosen)


def sample_windows(stream: np.ndarray, cfg: TrainConfig, rng: np.random.Generator):
  """A batch of random windows of the token stream: (tokens [B, T] int32, lengths [B])."""
  stream = np.asarray(stream, np.int32)
  if stream.size < 2:
    raise ValueError("training data needs at least 2 tokens")
  t = min(cfg.seq_len, stream.size)
  starts = rng.integers(0, stream.size - t + 1, size=cfg.batch_size)
  tokens = np.zeros((cfg.batch_size, cfg.seq_len), np.int32)
  for row, s in enumerate(starts):
    tokens[row, :t] = stream[s:s + t]
  return tokens, np.full(cfg.batch_size, t, np.int32)


def _structure(blocks: Sequence[Block]) -> tuple[tuple[str, str], ...]:
  """(kind, canonical config JSON) per block: everything the loss's code depends on."""
  return tuple((b.kind, json.dumps(b.config, sort_keys=True)) for b in blocks)


def make_loss(structure: tuple[tuple[str, str], ...]) -> Callable:
  """loss(params list, tokens [B, T], lengths [B]): mean next-token cross-entropy over real tokens."""
  kinds = [kind for kind, _ in structure]
  configs = [json.loads(config) for _, config in structure]
  fns = [block_fns.apply_fn(kind, cfg) for kind, cfg in zip(kinds, configs)]
  embed = kinds.index(EMBED)

  def loss(params, tokens, lengths):
    b, t = tokens.shape
    meta = contiguous_meta(b, t, 0, lengths)
    x = tokens
    for kind, cfg, fn, p in zip(kinds, configs, fns, params):
      if kind == HEAD and cfg["tied_to"] is not None:
        # The embed block's table, read here so its gradient sums both uses.
        p = {**p, "embedding": params[embed]["embedding"]}
      kv = block_fns.init_kv(cfg, b, t, jnp.float32) if kind == LAYERS else {}
      x, _ = fn(p, kv, x, meta)
    logp = jax.nn.log_softmax(x[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = (jnp.arange(t - 1)[None, :] < (lengths - 1)[:, None]).astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  return loss


def _schedule(count, cfg: TrainConfig):
  """Learning rate at (1-based) step `count`: optional linear warm-up, then optional cosine decay."""
  lr = jnp.asarray(cfg.lr, jnp.float32)
  if cfg.warmup:
    lr = lr * jnp.minimum(1.0, count / cfg.warmup)
  if cfg.cosine:
    progress = jnp.clip((count - cfg.warmup) / max(1, cfg.steps - cfg.warmup), 0.0, 1.0)
    lr = lr * (0.1 + 0.45 * (1 + jnp.cos(jnp.pi * progress)))
  return lr


def _adam(grads, state, cfg: TrainConfig):
  """One Adam step (bias-corrected) on grads clipped to a global norm; returns (updates, state)."""
  norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
  scale = jnp.minimum(1.0, cfg.clip_norm / (norm + 1e-12))
  grads = jax.tree.map(lambda g: g * scale, grads)
  count = state["count"] + 1
  mu = jax.tree.map(lambda m, g: cfg.b1 * m + (1 - cfg.b1) * g, state["mu"], grads)
  nu = jax.tree.map(lambda v, g: cfg.b2 * v + (1 - cfg.b2) * g * g, state["nu"], grads)
  lr_t = _schedule(count, cfg) * jnp.sqrt(1 - cfg.b2 ** count) / (1 - cfg.b1 ** count)
  updates = jax.tree.map(lambda m, v: -lr_t * m / (jnp.sqrt(v) + cfg.eps), mu, nu)
  return updates, {"count": count, "mu": mu, "nu": nu}


@functools.lru_cache(maxsize=8)
def _compiled(structure: tuple[tuple[str, str], ...], trained: tuple[int, ...], cfg: TrainConfig):
  """Jitted (train step, eval loss) for one chain structure, trainable set and optimiser settings.

  Params travel as dicts keyed by chain index ("0", "1", ...): trainable and frozen apart, so
  only the trainable ones are differentiated.
  """
  loss_fn = make_loss(structure)

  def merge(trainable, frozen):
    return [trainable[str(i)] if i in trained else frozen[str(i)] for i in range(len(structure))]

  @jax.jit
  def step(trainable, frozen, opt, tokens, lengths):
    loss, grads = jax.value_and_grad(lambda tp: loss_fn(merge(tp, frozen), tokens, lengths))(trainable)
    updates, opt = _adam(grads, opt, cfg)
    return jax.tree.map(jnp.add, trainable, updates), opt, loss

  eval_loss = jax.jit(lambda tp, fp, tokens, lengths: loss_fn(merge(tp, fp), tokens, lengths))
  return step, eval_loss


def train(blocks: Sequence[Block], stream: np.ndarray, cfg: TrainConfig,
          trainable_top_layers: int = 1, full: bool = False,
          progress: Callable[[str], None] | None = None) -> TrainResult:
  """Trains the chosen blocks of a chain (layers_per_block=1 for partial tuning) on a token stream.

  Deterministic for `cfg.seed`: the seed picks the training windows; the rest is fixed math.
  """
  if cfg.steps < 1:
    raise ValueError(f"steps must be >= 1, got {cfg.steps}")
  blocks = list(blocks)
  trained = trainable_indices(blocks, trainable_top_layers, full)
  frozen_ids = {i: blocks[i].id for i in range(len(blocks)) if i not in trained}
  # The seed only picks data: variants of one base reuse one compiled step.
  step, eval_loss = _compiled(_structure(blocks), tuple(trained), dataclasses.replace(cfg, seed=0))

  as_device = lambda p: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
  trainable = {str(i): as_device(blocks[i].params) for i in trained}
  frozen = {str(i): as_device(blocks[i].params) for i in frozen_ids}
  zeros = jax.tree.map(jnp.zeros_like, trainable)
  opt = {"count": jnp.zeros((), jnp.int32), "mu": zeros, "nu": zeros}

  rng = np.random.default_rng(cfg.seed)
  eval_batch = sample_windows(stream, cfg, np.random.default_rng([cfg.seed, 1]))
  loss_start = float(eval_loss(trainable, frozen, *eval_batch))
  losses = []
  report_every = max(1, cfg.steps // 5)
  for n in range(cfg.steps):
    trainable, opt, loss = step(trainable, frozen, opt, *sample_windows(stream, cfg, rng))
    losses.append(float(loss))
    if progress and ((n + 1) % report_every == 0 or n + 1 == cfg.steps):
      progress(f"  step {n + 1}/{cfg.steps}: loss {losses[-1]:.4f}")
  loss_end = float(eval_loss(trainable, frozen, *eval_batch))

  new_blocks = list(blocks)
  for i in trained:
    # Back to numpy in the block's own dtypes (training runs in float32).
    params = jax.tree.map(lambda new, old: np.asarray(new).astype(np.asarray(old).dtype),
                          trainable[str(i)], blocks[i].params)
    new_blocks[i] = Block(blocks[i].kind, blocks[i].config, params)
  new_blocks = _retie(new_blocks)
  for i, block_id in frozen_ids.items():
    # Frozen blocks are passed through as the same objects; their ids must not move.
    if new_blocks[i].params is not blocks[i].params or new_blocks[i].id != block_id:
      raise AssertionError(f"frozen block {i} ({blocks[i].kind}) changed during training")
  return TrainResult(new_blocks, trained, loss_start, loss_end, losses)


def _retie(blocks: list[Block]) -> list[Block]:
  """A tied head's config names the embed block's id; refresh it if the embedding was trained."""
  embed = next(b for b in blocks if b.kind == EMBED)
  out = []
  for b in blocks:
    if b.kind == HEAD and b.config["tied_to"] not in (None, embed.id):
      b = Block(b.kind, {**b.config, "tied_to": embed.id}, b.params)
    out.append(b)
  return out
