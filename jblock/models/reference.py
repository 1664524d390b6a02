"""The reference model: a chain of blocks run in order with a KV cache.

This is the same block code the serving engine runs (jblock.models.blocks), driven the
simplest way: one batch, contiguous KV pages per row, greedy decoding.
"""

import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS, Block
from jblock.models import blocks as block_fns
from jblock.models import rope as rope_lib
from jblock.models.attention import contiguous_meta
from jblock.models.config import ModelConfig


@functools.lru_cache(maxsize=64)  # bounded: compiled executables hold memory mappings
def _jitted(kind: str, config_json: str):
  # One compiled function per (kind, config): variants sharing a shape share compiled code.
  return jax.jit(block_fns.apply_fn(kind, json.loads(config_json)), donate_argnums=(1,))


def jitted_apply(block: Block):
  return _jitted(block.kind, json.dumps(block.config, sort_keys=True))


def runtime_params(chain: Sequence[Block], index: int) -> dict[str, Any]:
  """Params a block's apply function takes: a tied head also gets the embedding table."""
  block = chain[index]
  if block.kind == HEAD and block.config["tied_to"] is not None:
    embed = next(b for b in chain if b.kind == EMBED)
    return {**block.params, "embedding": embed.params["embedding"]}
  return block.params


def pad_batch(tokens, lengths=None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, T] int32 right-padded, lengths [B]) from an array or a list of sequences."""
  if isinstance(tokens, np.ndarray) or hasattr(tokens, "shape"):
    arr = np.asarray(tokens, np.int32)
    if arr.ndim == 1:
      arr = arr[None]
    lens = np.full(arr.shape[0], arr.shape[1], np.int32) if lengths is None else np.asarray(lengths, np.int32)
  else:
    seqs = [list(s) for s in tokens]
    lens = np.array([len(s) for s in seqs], np.int32) if lengths is None else np.asarray(lengths, np.int32)
    arr = np.zeros((len(seqs), max(len(s) for s in seqs)), np.int32)
    for i, s in enumerate(seqs):
      arr[i, :len(s)] = s
  if lens.shape != (arr.shape[0],) or lens.min() < 1 or lens.max() > arr.shape[1]:
    raise ValueError(f"lengths must be in [1, {arr.shape[1]}] per row, got {lens.tolist()}")
  return arr, lens


class Model:
  """A converted model: `blocks` (embed, layers..., head) plus reference `logits`/`generate`."""

  def __init__(self, config: ModelConfig, blocks: list[Block], name: str = ""):
    self.config = config
    self.blocks = blocks
    self.name = name
    self._device_params: list[dict[str, Any]] | None = None

  @property
  def dtype(self):
    return jnp.asarray(self.blocks[0].params["embedding"][:1]).dtype

  def _params(self) -> list[dict[str, Any]]:
    if self._device_params is None:
      self._device_params = [jax.tree.map(jnp.asarray, runtime_params(self.blocks, i))
                             for i in range(len(self.blocks))]
    return self._device_params

  def _run(self, x, kvs, meta, head_rows=None):
    """Runs the chain once; returns the head's logits and the updated caches."""
    params = self._params()
    for i, block in enumerate(self.blocks):
      if block.kind == HEAD and head_rows is not None:
        x = x[jnp.arange(x.shape[0]), head_rows][:, None]  # only the rows' last tokens
      x, kvs[i] = jitted_apply(block)(params[i], kvs[i], x, meta)
    return x, kvs

  def _new_cache(self, slots: int, max_len: int) -> list[Any]:
    return [block_fns.init_kv(b.config, slots, max_len, self.dtype) if b.kind == LAYERS else {}
            for b in self.blocks]

  def logits(self, tokens, lengths=None) -> np.ndarray:
    """float32 [B, T, V] logits; positions past a row's length are padding (undefined)."""
    toks, lens = pad_batch(tokens, lengths)
    b, t = toks.shape
    meta = contiguous_meta(b, t, 0, lens)
    out, _ = self._run(jnp.asarray(toks), self._new_cache(b, t), meta)
    return np.asarray(out)

  def generate(self, tokens, max_new_tokens: int = 32, lengths=None) -> np.ndarray:
    """Greedy decode with a KV cache: int32 [B, max_new_tokens] new tokens per row."""
    toks, lens = pad_batch(tokens, lengths)
    b, t = toks.shape
    max_len = t + max_new_tokens
    kvs = self._new_cache(b, max_len)
    logits, kvs = self._run(jnp.asarray(toks), kvs, contiguous_meta(b, max_len, 0, lens),
                            head_rows=lens - 1)
    out = []
    rerun = self._rerun_length()
    for step in range(max_new_tokens):
      next_tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
      out.append(next_tok)
      if step + 1 >= max_new_tokens:
        break
      if rerun and np.any(lens + step == rerun):
        # A row crosses the original length (Phi-3 LongRoPE): every row's sequence again, each
        # at its own length (rows not crossing get the KV they already had).
        seqs = [list(toks[i, :lens[i]]) + [int(o[i]) for o in out] for i in range(b)]
        full, full_lens = pad_batch(seqs, lens + step + 1)
        kvs = self._new_cache(b, max_len)
        logits, kvs = self._run(jnp.asarray(full), kvs, contiguous_meta(b, max_len, 0, full_lens),
                                head_rows=full_lens - 1)
      else:
        logits, kvs = self._run(next_tok[:, None], kvs, contiguous_meta(b, max_len, lens + step, 1))
    return np.asarray(jnp.stack(out, axis=1))

  def _rerun_length(self) -> int:
    layers = [b for b in self.blocks if b.kind == LAYERS]
    return rope_lib.rerun_length(layers[0].config.get("rope")) if layers else 0

