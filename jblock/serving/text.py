"""Text in and out of the engine: per-model tokenizers and incremental detokenization."""

import os
import threading
from typing import Sequence

import tokenizers

from jblock.errors import JBlockError
from jblock.runtime.engine_api import ModelInfo

TOKENIZER_FILE = "tokenizer.json"
# Prompt tokens decoded before the first new token: enough for decoders that drop a leading
# space at the start of a sequence (SentencePiece "▁") or merge across token boundaries.
_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"  # what a decoder makes of half a UTF-8 character


class TokenizerError(JBlockError):
  """A model's tokenizer is missing or unreadable: the server's set-up, not the request."""

  grpc_code = "FAILED_PRECONDITION"


def load_tokenizer(tokenizer_dir: str) -> tokenizers.Tokenizer:
  path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises plain Exception subclasses
    raise TokenizerError(f"cannot load tokenizer {path}: {e}") from e


class TokenizerCache:
  """Loads each tokenizer directory once; thread-safe."""

  def __init__(self):
    self._lock = threading.Lock()
    self._by_dir: dict[str, tokenizers.Tokenizer] = {}

  def get(self, info: ModelInfo) -> tokenizers.Tokenizer | None:
    """The model's tokenizer, or None if it has none (token-id-only model)."""
    if not info.tokenizer_dir:
      return None
    with self._lock:
      tokenizer = self._by_dir.get(info.tokenizer_dir)
      if tokenizer is None:
        tokenizer = load_tokenizer(info.tokenizer_dir)
        self._by_dir[info.tokenizer_dir] = tokenizer
      return tokenizer


def encode(tokenizer: tokenizers.Tokenizer, text: str) -> list[int]:
  # add_special_tokens applies the tokenizer's own post-processor (e.g. a BOS token).
  return tokenizer.encode(text, add_special_tokens=True).ids


class IncrementalDetokenizer:
  """Turns a stream of token ids into text deltas that never end in half a character.

  Decodes a sliding window (the tokens since the last emitted text plus a little context)
  and emits only text that a longer decode will not change. The concatenated deltas plus
  `flush()` equal decoding all the new tokens with the prompt as context.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, prompt_tokens: Sequence[int] = ()):
    self._tokenizer = tokenizer
    self._ids = list(prompt_tokens[-_CONTEXT_TOKENS:])
    self._prefix = 0  # window start: context for the decoder
    self._read = len(self._ids)  # tokens before this are already emitted as text

  def _decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=True)

  def add(self, token_ids: Sequence[int]) -> str:
    """Takes new tokens; returns the text they complete (maybe empty)."""
    self._ids.extend(int(t) for t in token_ids)
    emitted = self._decode(self._ids[self._prefix:self._read])
    full = self._decode(self._ids[self._prefix:])
    if len(full) <= len(emitted) or full.endswith(_REPLACEMENT):
      return ""  # an incomplete character (or nothing visible) so far: wait for more tokens
    delta = full[len(emitted):]
    # The emitted tokens become the context; drop what is older to keep decodes short.
    self._ids = self._ids[self._read:]
    self._prefix, self._read = 0, len(self._ids)
    return delta

  def flush(self) -> str:
    """The text still held back at the end of the stream (broken characters included)."""
    emitted = self._decode(self._ids[self._prefix:self._read])
    full = self._decode(self._ids[self._prefix:])
    self._prefix = self._read = len(self._ids)
    return full[len(emitted):]
