"""Running a model's chain on calibration windows and measuring what a substitution changes.

`ChainRunner` runs the chain through the block functions the engine runs (jblock.models.blocks
via jblock.models.reference.jitted_apply, paged KV laid out as the reference path lays it
out), LoRA deltas applied from one-slot banks. It keeps every block's input and the unmodified
model's log-probabilities, so measuring a substitution at position p runs only blocks p..end:
the block's own relative L2 error and cosine similarity, the model's KL divergence, top-1
agreement and perplexity against the unmodified model.
"""

import math
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS, Block
from jblock.convert import full_delta
from jblock.models import blocks as block_fns
from jblock.models.attention import contiguous_meta
from jblock.models.lora import single_bank
from jblock.models.reference import jitted_apply, runtime_params


def progress_bar(total: int, desc: str, enabled: bool):
  """A tqdm bar on stderr, shown only when `enabled`."""
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
              dynamic_ncols=True)




class ChainRunner:
  """A model's chain over one split's windows, batch by batch, with the engine's block functions.

  Keeps every block's input and the final log-probabilities of the unmodified model, so a
  substitution at position p runs only blocks p..end.
  """

  def __init__(self, blocks: Sequence[Block], windows: np.ndarray, batch_size: int = 16,
               progress: bool = False, deltas: Sequence[Block | None] | None = None):
    self.blocks = list(blocks)
    # A LoRA adapter's delta block per position (None: none there), applied from one-slot banks.
    self.deltas = list(deltas) if deltas is not None else [None] * len(self.blocks)
    self._banks: dict[int, Any] = {}
    self.windows = np.asarray(windows, np.int32)
    self._params: dict[tuple[int, int], Any] = {}
    self._dtype = jnp.asarray(self.blocks[0].params["embedding"][:1]).dtype
    self.batches = []
    for lo in range(0, self.windows.shape[0], batch_size):
      toks = jnp.asarray(self.windows[lo:lo + batch_size])
      b, t = toks.shape
      self.batches.append((toks, contiguous_meta(b, t, 0, t)))
    self.inputs: list[list[Any]] = []  # [batch][position] -> that block's input
    self.ref_logp: list[Any] = []
    nll = 0.0
    with progress_bar(len(self.batches), "reference", progress) as bar:
      for toks, meta in self.batches:
        xs, x = [], toks
        for i in range(len(self.blocks)):
          xs.append(x)
          x = self.apply(self.blocks, i, x, meta, self.deltas[i])
        self.inputs.append(xs)
        logp = jax.nn.log_softmax(x, axis=-1)
        self.ref_logp.append(logp)
        nll += float(_nll_sum(logp, toks))
        bar.update()
    self.tokens = int(self.windows.shape[0] * self.windows.shape[1])
    self.ref_nll = nll / self.windows.shape[0] / max(1, self.windows.shape[1] - 1)

  def apply(self, chain: Sequence[Block], i: int, x, meta, delta: Block | None = None):
    block = chain[i]
    if delta is not None:
      if i not in self._banks:
        self._banks[i] = (full_delta.single_bank(delta) if delta.kind == full_delta.QDELTA
                          else single_bank(delta))
      meta = {**meta, "lora": self._banks[i], "adapter": jnp.zeros(x.shape[0], jnp.int32)}
    tied = block.kind == HEAD and block.config.get("tied_to") is not None
    embed = next(b for b in chain if b.kind == EMBED) if tied else None
    # Keyed by object identity; the entry keeps the objects alive so an id is never reused.
    key = (id(block), id(embed))
    entry = self._params.get(key)
    if entry is None:
      entry = (block, embed, jax.tree.map(jnp.asarray, runtime_params(chain, i)))
      self._params[key] = entry
    params = entry[2]
    b, t = x.shape[0], x.shape[1]
    kv = block_fns.init_kv(block.config, b, t, self._dtype) if block.kind == LAYERS else {}
    y, _ = jitted_apply(block)(params, kv, x, meta)
    return y

  def measure(self, substitutions: Mapping[int, Block], target: int | None = None,
              progress: bool = False, desc: str = "measure") -> dict[str, float]:
    """The chain with `substitutions` (position -> block) against the unmodified model.

    target: the position whose block-level error is reported (its candidate's output vs the
    model's own block on the same inputs, which include the other substitutions' effects).
    A substituted position runs without its delta (an adapter's own block substituted for
    itself is the delta dropped).
    """
    if target is not None and target not in substitutions:
      raise ValueError(f"target position {target} is not substituted")
    chain = list(self.blocks)
    for p, block in substitutions.items():
      chain[p] = block
    start = min(substitutions) if substitutions else len(chain)
    kl = top1 = nll = 0.0
    err2 = ref2 = cos = 0.0
    block_tokens = 0
    with progress_bar(len(self.batches), desc, progress) as bar:
      for n, (toks, meta) in enumerate(self.batches):
        if start >= len(chain):
          logp = self.ref_logp[n]
        else:
          x = self.inputs[n][start]
          for i in range(start, len(chain)):
            y = self.apply(chain, i, x, meta, None if i in substitutions else self.deltas[i])
            if i == target:
              y0 = self.apply(self.blocks, i, x, meta, self.deltas[i])
              e2, r2, c, count = _block_error(y, y0)
              err2, ref2, cos, block_tokens = err2 + e2, ref2 + r2, cos + c, block_tokens + count
            x = y
          logp = jax.nn.log_softmax(x, axis=-1)
        ref = self.ref_logp[n]
        kl += float(jnp.sum(jnp.exp(ref) * (ref - logp)))
        top1 += float(jnp.sum(jnp.argmax(ref, -1) == jnp.argmax(logp, -1)))
        nll += float(_nll_sum(logp, toks))
        bar.update()
    rows, t = self.windows.shape
    out = {"kl": max(0.0, kl / self.tokens), "top1": top1 / self.tokens, "tokens": self.tokens,
           "perplexity": math.exp(nll / rows / max(1, t - 1)),
           "perplexity_original": math.exp(self.ref_nll)}
    if target is not None:
      out["block_rel_l2"] = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
      out["block_cosine"] = cos / block_tokens
    return out


def _nll_sum(logp, toks):
  """Sum of -log p(next token) over every position that has a next token."""
  picked = jnp.take_along_axis(logp[:, :-1], toks[:, 1:, None].astype(jnp.int32), axis=-1)
  return -jnp.sum(picked)


def _block_error(y, y0):
  y, y0 = y.astype(jnp.float32), y0.astype(jnp.float32)
  y, y0 = y.reshape(-1, y.shape[-1]), y0.reshape(-1, y0.shape[-1])
  d = y - y0
  dot = jnp.sum(y * y0, -1)
  norms = jnp.linalg.norm(y, axis=-1) * jnp.linalg.norm(y0, axis=-1)
  cos = jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0),
                  jnp.where(jnp.all(d == 0, -1), 1.0, 0.0))
  return (float(jnp.sum(d * d)), float(jnp.sum(y0 * y0)), float(jnp.sum(jnp.clip(cos, -1.0, 1.0))),
          int(y.shape[0]))


__all__ = ["ChainRunner", "progress_bar"]
