"""The host side of a head batch's optional per-row inputs and outputs.

Plain rows (greedy or temperature / top-k / top-p sampling) travel in the packed StepMeta. What
only some requests use travels beside it as `StepMeta.head`, a dict of numpy arrays built here
for a batch that ends at the head; a key is present only when some row of the batch needs it,
so a batch whose rows use none gets `head = None` and runs the plain compiled step
(jblock.runtime.logits applies them on the device):

  logprobs        int32 [B]       1: the row wants its token's logprob and the top alternatives
  targets         int32 [B, T]    the next prompt token at each position (-1: none): prompt logprobs
  penalties       f32 [B, 3]      presence, frequency, repetition
  history         int32 [B, L]    tokens the penalties count (-1: padding); L a power of two
  history_output  int32 [B, L]    1 where the token was generated (presence / frequency count those)
  bias_ids, bias  [B, N]          logit_bias, and min_tokens' -inf on the stop ids (-1: padding)
  min_p           f32 [B]
  bitmask         int32 [B, W]    allowed tokens of a constrained row (all bits set elsewhere)

The head's outputs then come back as a dict too (`tokens` plus what was asked); `row_result`
reads one row of either form.
"""

import math
from typing import Any

import numpy as np

from jblock.runtime.engine_api import MAX_LOGPROBS, TokenLogprobs
from jblock.runtime.step import StepItem

TOP = MAX_LOGPROBS  # alternatives computed per position (one compiled shape); rows slice theirs


def _bucket(n: int, least: int) -> int:
  return max(least, 1 << max(n - 1, 0).bit_length())


def _wants_prompt_logprobs(req, item: StepItem) -> bool:
  return (req.params.prompt_logprobs is not None and not req.replay_to
          and item.start < len(req.prompt))


def build(items: list[StepItem], b_pad: int, t_pad: int, vocab_size: int) -> dict | None:
  """The optional head inputs of a batch's rows (see the module docstring); None if no row
  uses any."""
  if not any(it.req.params.uses_head_inputs or it.req.constraint is not None for it in items):
    return None  # the plain step: most decode batches stop here
  rows = [(row, it, it.req, it.req.params) for row, it in enumerate(items)]
  out: dict[str, np.ndarray] = {}
  if any(p.logprobs is not None and it.final for _, it, _, p in rows):
    out["logprobs"] = np.zeros(b_pad, np.int32)
  if any(_wants_prompt_logprobs(req, it) for _, it, req, _ in rows):
    out["targets"] = np.full((b_pad, t_pad), -1, np.int32)
  penalised = [(row, it, req, p) for row, it, req, p in rows if p.uses_penalties and it.final]
  if penalised:
    length = max(len(req.generated) + (len(req.prompt) if p.repetition_penalty != 1 else 0)
                 for _, _, req, p in penalised)
    out["penalties"] = np.array([[0.0, 0.0, 1.0]] * b_pad, np.float32)
    out["history"] = np.full((b_pad, _bucket(length, 16)), -1, np.int32)
    out["history_output"] = np.zeros((b_pad, out["history"].shape[1]), np.int32)
  biased = {row: _bias(req, p) for row, it, req, p in rows if it.final}
  biased = {row: b for row, b in biased.items() if b}
  if biased:
    width = _bucket(max(len(b) for b in biased.values()), 8)
    out["bias_ids"] = np.full((b_pad, width), -1, np.int32)
    out["bias"] = np.zeros((b_pad, width), np.float32)
  if any(p.min_p > 0 and it.final for _, it, _, p in rows):
    out["min_p"] = np.zeros(b_pad, np.float32)
  constrained = [(row, req.constraint) for row, it, req, _ in rows
                 if req.constraint is not None and it.final]
  if constrained:
    width = math.ceil(vocab_size / 32) or max(c.width for _, c in constrained)
    out["bitmask"] = np.full((b_pad, width), -1, np.int32)
  if not out:
    return None
  for row, it, req, p in rows:
    if "logprobs" in out and p.logprobs is not None and it.final:
      out["logprobs"][row] = 1
    if "targets" in out and _wants_prompt_logprobs(req, it):
      end = min(it.start + it.n + 1, len(req.prompt))
      nxt = req.prompt[it.start + 1:end]
      out["targets"][row, :len(nxt)] = nxt
    if "min_p" in out and it.final:
      out["min_p"][row] = p.min_p
  for row, it, req, p in penalised:
    history = list(req.generated)
    flags = [1] * len(history)
    if p.repetition_penalty != 1:
      history, flags = req.prompt + history, [0] * len(req.prompt) + flags
    out["penalties"][row] = (p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
    out["history"][row, :len(history)] = history
    out["history_output"][row, :len(flags)] = flags
  for row, pairs in biased.items():
    out["bias_ids"][row, :len(pairs)] = [t for t, _ in pairs]
    out["bias"][row, :len(pairs)] = [b for _, b in pairs]
  for row, constraint in constrained:
    mask = np.asarray(constraint.mask(), np.int32)
    out["bitmask"][row, :mask.shape[0]] = mask
    out["bitmask"][row, mask.shape[0]:] = 0
  return out


def _bias(req, params) -> list[tuple[int, float]]:
  """The row's additive logit bias: logit_bias, plus -inf on the stop ids while it has fewer
  than min_tokens tokens."""
  pairs = dict(params.logit_bias)
  if len(req.generated) < params.min_tokens:
    pairs.update({t: -math.inf for t in req.stop_ids})
  return sorted(pairs.items())


def row_result(y: Any, row: int, item: StepItem) -> tuple[int, TokenLogprobs | None,
                                                           list[TokenLogprobs] | None]:
  """(sampled token, its logprobs if the row asked, prompt logprobs of the chunk if asked)."""
  if not isinstance(y, dict):
    return int(y[row]), None, None
  req = item.req
  token = int(y["tokens"][row])
  logprobs = prompt = None
  k = req.params.logprobs
  if k is not None and "logprob" in y and item.final:
    logprobs = TokenLogprobs(token, float(y["logprob"][row]), _top(y["top_ids"][row],
                                                                   y["top_logprobs"][row], k))
  if "prompt_logprob" in y and _wants_prompt_logprobs(req, item):
    k = req.params.prompt_logprobs
    end = min(item.start + item.n + 1, len(req.prompt))
    prompt = [] if item.start > 0 else [None]  # nothing predicts the first prompt token
    for j, target in enumerate(req.prompt[item.start + 1:end]):
      prompt.append(TokenLogprobs(int(target), float(y["prompt_logprob"][row, j]),
                                  _top(y["prompt_top_ids"][row, j],
                                       y["prompt_top_logprobs"][row, j], k)))
  return token, logprobs, prompt


def _top(ids, values, k: int) -> tuple[tuple[int, float], ...]:
  return tuple((int(i), float(v)) for i, v in zip(ids[:k], values[:k]))
