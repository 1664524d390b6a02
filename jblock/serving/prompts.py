"""What the frontend knows of one model's text side, and the checks a prompt passes first.

`ModelText` holds a model's tokenizer, the byte bound a prompt must keep to (derived from the
model's context length, so an oversized prompt is refused before it is tokenised), its EOS ids
(the model's config merged with its generation_config.json) and, lazily, the transformers
tokenizer whose `apply_chat_template` renders chat messages. The functions below validate
chat messages and stop strings as either protocol delivers them.
"""

import json
import os
import threading

import tokenizers

from jblock.errors import InvalidRequestError
from jblock.runtime.engine_api import ModelInfo

# How many bytes of text one token may stand for at most, times this slack (normalisers that
# drop characters): a prompt with more bytes than max_seq_len * that cannot fit the model.
_BYTES_SLACK = 4
MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 256
# Used for chat when a model's tokenizer files bring no chat template (the demo zoo).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
_ROLES = ("system", "user", "assistant", "developer", "tool")


def _max_token_bytes(tokenizer: tokenizers.Tokenizer) -> int:
  """UTF-8 bytes of the longest vocabulary entry (byte-level BPE: >= the bytes it decodes to)."""
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  return max((len(token.encode("utf-8")) for token in vocab), default=1)


def _generation_config_eos(tokenizer_dir: str | None) -> tuple[int, ...]:
  if not tokenizer_dir:
    return ()
  path = os.path.join(tokenizer_dir, "generation_config.json")
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f).get("eos_token_id")
  except (OSError, ValueError, AttributeError):
    return ()
  values = value if isinstance(value, list) else [value]
  return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))


class ModelText:
  """A model's tokenizer, its byte bound, EOS ids and (lazily) its chat tokenizer."""

  def __init__(self, info: ModelInfo, tokenizer: tokenizers.Tokenizer | None,
               max_request_bytes: int):
    self.info = info
    self.tokenizer = tokenizer
    extra = _generation_config_eos(info.tokenizer_dir)
    self.eos_ids = tuple(sorted({*info.eos_token_ids, *(e for e in extra
                                                         if 0 <= e < info.vocab_size)}))
    per_token = _max_token_bytes(tokenizer) if tokenizer is not None else 0
    self.max_prompt_bytes = min(max_request_bytes, info.max_seq_len * max(per_token, 4)
                                * _BYTES_SLACK)
    self._chat = None
    self._chat_lock = threading.Lock()

  def chat_text(self, messages: list[dict]) -> str:
    with self._chat_lock:
      if self._chat is None:
        from transformers import AutoTokenizer  # slow import: only once chat is used
        self._chat = AutoTokenizer.from_pretrained(self.info.tokenizer_dir)
    template = None if self._chat.chat_template else DEFAULT_CHAT_TEMPLATE
    try:
      return self._chat.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=True)
    except Exception as e:  # a template's raise_exception, or a bad message shape
      raise InvalidRequestError("messages", f"the chat template rejected them: {e}") from None

  def check_bytes(self, prompt: str, field: str) -> None:
    """Refuses a prompt of more bytes than the model can take, without tokenising it."""
    if len(prompt) > self.max_prompt_bytes:  # at least one byte per character: no copy needed
      size = len(prompt)
    else:
      size = len(utf8(prompt, field))
    if size > self.max_prompt_bytes:
      raise InvalidRequestError(
          field, f"is {size} bytes, more than model {self.info.name!r} can take in "
          f"{self.info.max_seq_len} tokens (at most {self.max_prompt_bytes} bytes); refused "
          "without tokenising it")


def validate_messages(messages) -> list[dict]:
  """Chat messages as {role, content} strings (OpenAI text parts joined)."""
  if not isinstance(messages, list) or not messages:
    raise InvalidRequestError("messages", "must be a non-empty list")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise InvalidRequestError(f"messages[{i}]", "must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in _ROLES:
      raise InvalidRequestError(f"messages[{i}].role", f"must be one of {list(_ROLES)}")
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
      parts = []
      for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or \
            not isinstance(part.get("text"), str):
          raise InvalidRequestError(f"messages[{i}].content", "only text parts are supported")
        parts.append(part["text"])
      content = "".join(parts)
    if not isinstance(content, str):
      raise InvalidRequestError(f"messages[{i}].content", "must be a string")
    out.append({"role": role, "content": content})
  return out


def utf8(value: str, field: str) -> bytes:
  try:
    return value.encode("utf-8")
  except UnicodeEncodeError:
    raise InvalidRequestError(field, "is not valid Unicode (a lone surrogate?)") from None


def check_stop(stop) -> tuple[str, ...]:
  stop = tuple(stop or ())
  if len(stop) > MAX_STOP_STRINGS:
    raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
  for s in stop:
    if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
      raise InvalidRequestError(
          "stop", f"each stop string must be 1-{MAX_STOP_STRING_CHARS} characters")
    utf8(s, "stop")
  return stop


__all__ = ["DEFAULT_CHAT_TEMPLATE", "MAX_STOP_STRINGS", "MAX_STOP_STRING_CHARS", "ModelText",
           "check_stop", "utf8", "validate_messages"]
