"""Logprobs in OpenAI's response shapes, from the engine's TokenLogprobs.

Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one entry per token;
with echo the prompt's tokens come first (the first has no logprob: null). Chat:
{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.

A token's string is the tokenizer's decode of that one id (a piece of a multi-byte character
shows as U+FFFD, as in vLLM); a model without a tokenizer names tokens "token_id:<id>".
The values are the model's raw distribution (jblock.runtime.logits), before temperature,
penalties, bias or a grammar.
"""

from typing import Sequence

from jblock.runtime.engine_api import TokenLogprobs


class TokenText:
  """Strings of single tokens for one model (cached: the same ids recur across tokens)."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self._cache: dict[int, str] = {}

  def __call__(self, token: int) -> str:
    text = self._cache.get(token)
    if text is None:
      if self._tokenizer is None:
        text = f"token_id:{token}"
      else:
        text = self._tokenizer.decode([token], skip_special_tokens=False)
      if len(self._cache) < 65536:
        self._cache[token] = text
    return text


def completion_logprobs(entries: Sequence[TokenLogprobs | None], token_ids: Sequence[int],
                        token_text: TokenText, k: int, offset: int = 0) -> dict:
  """OpenAI completions' logprobs object for these tokens (entries[i] None: no logprob, as
  for the first prompt token); text_offset counts characters from `offset`."""
  out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  for token, entry in zip(token_ids, entries):
    text = token_text(token)
    out["tokens"].append(text)
    out["text_offset"].append(offset)
    offset += len(text)
    if entry is None:
      out["token_logprobs"].append(None)
      out["top_logprobs"].append(None)
      continue
    out["token_logprobs"].append(entry.logprob)
    top = {token_text(t): v for t, v in entry.top[:k]}
    top.setdefault(text, entry.logprob)  # the chosen token is always listed, as OpenAI does
    out["top_logprobs"].append(top)
  return out


def merge_completion_logprobs(parts: Sequence[dict]) -> dict:
  out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  for part in parts:
    for key in out:
      out[key].extend(part[key])
  return out


def chat_logprobs(entries: Sequence[TokenLogprobs | None], token_text: TokenText,
                  k: int) -> list[dict]:
  """OpenAI chat's logprobs.content entries for these tokens."""
  out = []
  for entry in entries:
    if entry is None:
      continue
    text = token_text(entry.token)
    out.append({"token": text, "logprob": entry.logprob, "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": token_text(t), "logprob": v,
                                  "bytes": list(token_text(t).encode("utf-8"))}
                                 for t, v in entry.top[:k]]})
  return out


def cumulative_logprob(entries: Sequence[TokenLogprobs | None]) -> float:
  """The sum of a choice's token logprobs: how best_of ranks its choices."""
  return sum(e.logprob for e in entries if e is not None)


__all__ = ["TokenText", "chat_logprobs", "completion_logprobs", "cumulative_logprob",
           "merge_completion_logprobs"]
