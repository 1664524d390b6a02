"""The head's per-row controls on the device: penalties, logit bias, grammar masks, min-p and
logprobs (the inputs jblock.runtime.head_rows builds; each applies only when its key is there).

Order, as vLLM applies them: the raw logits give the logprobs (OpenAI's and vLLM's default: the
model's own distribution); then repetition, frequency and presence penalties, logit bias, the
grammar mask, and sampling (temperature, top-k, top-p, min-p: jblock.runtime.sampling).
"""

import jax
import jax.numpy as jnp

from jblock.runtime.head_rows import TOP
from jblock.runtime.sampling import sample


def _penalise(logits, penalties, history, history_output):
  """Repetition (transformers': tokens seen in prompt or output), then frequency and presence
  (OpenAI's: tokens generated, per occurrence / once)."""
  b, vocab = logits.shape
  rows = jnp.arange(b)[:, None]
  ids = jnp.where(history >= 0, history, vocab)  # padding lands out of range: dropped
  seen = jnp.zeros((b, vocab), bool).at[rows, ids].set(True, mode="drop")
  counts = jnp.zeros((b, vocab), jnp.float32).at[rows, ids].add(
      history_output.astype(jnp.float32), mode="drop")
  presence, frequency, repetition = penalties[:, 0:1], penalties[:, 1:2], penalties[:, 2:3]
  logits = jnp.where(seen, jnp.where(logits > 0, logits / repetition, logits * repetition), logits)
  return logits - frequency * counts - presence * (counts > 0)


def _bias(logits, bias_ids, bias):
  vocab = logits.shape[1]
  rows = jnp.arange(logits.shape[0])[:, None]
  return logits.at[rows, jnp.where(bias_ids >= 0, bias_ids, vocab)].add(bias, mode="drop")


def _mask(logits, bitmask):
  vocab = logits.shape[1]
  token = jnp.arange(vocab)
  bits = (bitmask[:, token // 32] >> (token % 32)[None, :]) & 1
  return jnp.where(bits == 1, logits, -jnp.inf)


def _top(logprobs):
  values, ids = jax.lax.top_k(logprobs, TOP)
  return ids.astype(jnp.int32), values


def head_outputs(logits, m, extras):
  """logits [B, V] f32 of each row's last token; m: the unpacked StepMeta; extras: the head
  inputs (None: plain sampling). Returns the tokens [B], or a dict with `tokens` and what the
  extras asked for (logprob [B], top_ids / top_logprobs [B, TOP])."""
  if not extras:
    return sample(logits, m["temperature"], m["top_k"], m["top_p"], m["seed_lo"], m["seed_hi"],
                  m["step"])
  raw = logits
  if "penalties" in extras:
    logits = _penalise(logits, extras["penalties"], extras["history"], extras["history_output"])
  if "bias_ids" in extras:
    logits = _bias(logits, extras["bias_ids"], extras["bias"])
  if "bitmask" in extras:
    logits = _mask(logits, extras["bitmask"])
  tokens = sample(logits, m["temperature"], m["top_k"], m["top_p"], m["seed_lo"], m["seed_hi"],
                  m["step"], extras.get("min_p"))
  out = {"tokens": tokens}
  if "logprobs" in extras:
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    out["logprob"] = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    out["top_ids"], out["top_logprobs"] = _top(logprobs)
  return out


def prompt_outputs(all_logits, targets):
  """all_logits [B, T, V] f32 of every position; targets [B, T] (-1: none) -> the logprob of
  each next prompt token and the top alternatives at each position."""
  logprobs = jax.nn.log_softmax(all_logits, axis=-1)
  chosen = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  ids, values = _top(logprobs)
  return {"prompt_logprob": jnp.where(targets >= 0, chosen, 0.0), "prompt_top_ids": ids,
          "prompt_top_logprobs": values}
