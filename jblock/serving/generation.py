"""One admitted request's output as text: incremental detokenisation and stop strings.

A `Generation` turns the engine's token chunks into `Delta`s (token ids and the text they add,
through `tokenizers.decoders.DecodeStream`), holds back text that may be the start of a stop
string, cancels the request once one appears, and reports its finish reason and `Usage`. At the
end it flushes what the stream still holds back (an incomplete character, U+FFFD in a whole
decode), so a request's deltas concatenate to the whole decode of its tokens on every protocol.
Closing it hands its quota and in-flight slot back to the frontend that admitted it.
"""

import asyncio
import dataclasses
import threading
from typing import AsyncIterator, Iterator, Sequence

from tokenizers import decoders

from jblock.runtime.engine_api import RequestHandle
from jblock.serving.prompts import ModelText
from jblock.serving.status import error_code
from jblock.serving.tenants import Principal

# Prompt tokens given to the decoder as context before the first new token (spacing).
_DECODE_CONTEXT_TOKENS = 6


@dataclasses.dataclass(frozen=True)
class Delta:
  token_ids: tuple[int, ...]
  text: str
  logprobs: tuple = ()  # TokenLogprobs per token id, when the request asked for logprobs


@dataclasses.dataclass(frozen=True)
class Usage:
  prompt_tokens: int
  completion_tokens: int

  @property
  def total_tokens(self) -> int:
    return self.prompt_tokens + self.completion_tokens


class Generation:
  """One admitted request: iterate (sync or async) for its Deltas; then `finish_reason`
  ("stop" | "length" | "cancelled") and `usage`. cancel() stops it and frees its KV."""

  def __init__(self, frontend, principal: Principal, mt: ModelText,
               prompt: list[int], handle: RequestHandle, stop: Sequence[str]):
    # `frontend`: the Frontend that admitted it (not imported here: it imports this module);
    # its _end and _observe release and count the request, its stream_pool waits for tokens.
    self._frontend = frontend
    self.principal = principal
    self.model = mt.info.name
    self.prompt_tokens = prompt
    self.handle = handle
    self.request_id = handle.request_id
    self._tokenizer = mt.tokenizer
    self._stop = tuple(stop)
    self._context = list(prompt[-_DECODE_CONTEXT_TOKENS:])
    if self._tokenizer is not None:
      self._decoder = decoders.DecodeStream(ids=list(self._context), skip_special_tokens=True)
    self._new_ids: list[int] = []  # every generated token, for the end-of-stream flush
    self._decoded = ""  # the text the decode stream has produced so far
    self._held = ""  # text not emitted yet: it may be the start of a stop string
    self._consumed = 0  # tokens taken from the engine and accounted for
    self._stopped_by_string = False
    self._closed = False
    self._lock = threading.Lock()
    self.finish_reason: str | None = None

  @property
  def tokenizer(self):
    """The model's tokenizers.Tokenizer (None: a model served by token ids)."""
    return self._tokenizer

  def decode(self, token_ids: Sequence[int]) -> str:
    """The text of `token_ids` as a finished generation shows it ("" without a tokenizer)."""
    if self._tokenizer is None:
      return ""
    return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

  @property
  def usage(self) -> Usage:
    return Usage(len(self.prompt_tokens), self._consumed)

  def cancel(self) -> None:
    self.handle.cancel()

  def close(self, status: str | None = None) -> None:
    """Releases the quota and in-flight slot (idempotent); cancels if still running."""
    with self._lock:
      if self._closed:
        return
      self._closed = True
    if not self.handle.done:
      self.handle.cancel()
    self._frontend._end(self.principal)
    self._frontend._observe(self.principal, None, self,
                            status or ("OK" if self.finish_reason else "CANCELLED"))

  def _hold_back(self) -> int:
    """Length of the longest suffix of the held text that may start a stop string."""
    held = self._held
    for start in range(max(0, len(held) - max(len(s) for s in self._stop) + 1), len(held)):
      suffix = held[start:]
      if any(s.startswith(suffix) for s in self._stop):
        return len(held) - start
    return 0

  def _take(self, chunk: Sequence[int]) -> Delta | None:
    """Turns engine tokens into a Delta; detects stop strings. None: nothing to send."""
    if self._stopped_by_string:
      return None
    ids, first = [], self._consumed
    for token in chunk:
      ids.append(int(token))
      self._consumed += 1
      if self._tokenizer is None:
        continue
      self._new_ids.append(int(token))
      piece = self._decoder.step(self._tokenizer, int(token))
      if piece:
        self._held += piece
        self._decoded += piece
      if self._cut_at_stop():
        self.handle.cancel()  # frees its KV; reported as "stop"
        break
    if self._stopped_by_string or not self._stop:
      out, self._held = self._held, ""
    else:
      keep = self._hold_back()
      cut = len(self._held) - keep
      out, self._held = self._held[:cut], self._held[cut:]
    logprobs = ()
    if ids and self.handle.params.logprobs is not None:
      logprobs = tuple(self.handle.logprobs(first, first + len(ids)))
    return Delta(tuple(ids), out, logprobs) if ids or out else None

  def _cut_at_stop(self) -> bool:
    """Cuts the held text before the first stop string in it; True if there was one."""
    hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
    if hits:
      self._held = self._held[:min(hits)]
      self._stopped_by_string = True
    return bool(hits)

  def _flush_decoder(self) -> None:
    """Adds what the decode stream still holds back at the end: the bytes of an incomplete
    UTF-8 character, which a whole decode shows as U+FFFD. Without this a stream ending inside a
    character lost them (ten partial-character tokens gave "", not ten U+FFFD)."""
    if self._stopped_by_string or not self._new_ids:  # no tokenizer: no ids kept
      return
    decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    whole = decode(self._context + self._new_ids)[len(decode(self._context)):]
    if len(whole) > len(self._decoded) and whole.startswith(self._decoded):
      self._held += whole[len(self._decoded):]
      self._decoded = whole
      self._cut_at_stop()

  def _finish(self) -> Delta | None:
    self._flush_decoder()
    self.finish_reason = "stop" if self._stopped_by_string else self.handle.finish_reason
    out, self._held = self._held, ""
    return Delta((), out) if out else None

  def __iter__(self) -> Iterator[Delta]:
    try:
      for chunk in self.handle.iter_chunks():
        delta = self._take(chunk)
        if delta is not None:
          yield delta
        if self._stopped_by_string:
          break
      last = self._finish()
      if last is not None:
        yield last
    except BaseException as e:
      self.close(error_code(e) if isinstance(e, Exception) else None)
      raise
    self.close()

  async def __aiter__(self) -> AsyncIterator[Delta]:
    """The same Deltas, waiting for tokens on a thread, never on the event loop."""
    loop = asyncio.get_running_loop()
    chunks = self.handle.iter_chunks()
    done = object()
    try:
      while True:
        chunk = await loop.run_in_executor(self._frontend.stream_pool, next, chunks, done)
        if chunk is done:
          break
        delta = self._take(chunk)
        if delta is not None:
          yield delta
        if self._stopped_by_string:
          break
      last = self._finish()
      if last is not None:
        yield last
    except BaseException as e:
      self.close(error_code(e) if isinstance(e, Exception) else None)
      raise
    self.close()


__all__ = ["Delta", "Generation", "Usage"]
