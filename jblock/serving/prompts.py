"""What the frontend knows of one model's text side, and the checks a prompt passes first.

`ModelText` holds a model's tokenizer, the byte bound a prompt must keep to (derived from the
model's context length, so an oversized prompt is refused before it is tokenised), its EOS ids
(the model's config merged with its generation_config.json) and, lazily, the transformers
tokenizer whose `apply_chat_template` renders chat messages (and a request's tools: see
tool_calls.py). The functions below validate chat messages (tool calls and results included)
and stop strings as either protocol delivers them.
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
# Used for chat when a model's tokenizer files bring no chat template (the demo zoo). Plain
# messages render as "role: content" lines; with tools, a system preamble lists them and asks
# for Hermes-style <tool_call> blocks (tool_calls.py's default parser), and assistant tool calls
# and tool results (those with a tool_call_id) render in the same convention. transformers
# renders with trim_blocks: a newline right after a {% tag %} is dropped, hence {{ '\\n' }}.
DEFAULT_CHAT_TEMPLATE = (
    "{% if tools %}system: "
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>{{ '\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ message['role'] }}: "
    "{% if message['role'] == 'tool' and message['tool_call_id'] is defined %}"
    "<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson }}\n</tool_call>"
    "{% endfor %}{{ '\\n' }}{% endif %}"
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

  def chat_text(self, messages: list[dict], tools: list[dict] | None = None) -> str:
    """Validated messages rendered by the model's chat template (DEFAULT_CHAT_TEMPLATE when it
    has none); `tools`, OpenAI tool dicts, reach the template as transformers passes them."""
    with self._chat_lock:
      if self._chat is None:
        from transformers import AutoTokenizer  # slow import: only once chat is used
        self._chat = AutoTokenizer.from_pretrained(self.info.tokenizer_dir)
    template = None if self._chat.chat_template else DEFAULT_CHAT_TEMPLATE
    try:
      return self._chat.apply_chat_template(messages, tools=tools, chat_template=template,
                                            tokenize=False, add_generation_prompt=True)
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


def _text_content(content, field: str) -> str:
  if isinstance(content, list):  # OpenAI content parts: only text parts are supported
    parts = []
    for part in content:
      if not isinstance(part, dict) or part.get("type") != "text" or \
          not isinstance(part.get("text"), str):
        raise InvalidRequestError(field, "only text parts are supported")
      parts.append(part["text"])
    content = "".join(parts)
  if not isinstance(content, str):
    raise InvalidRequestError(field, "must be a string")
  return content


def _tool_calls(calls, field: str) -> list[dict]:
  """An assistant's tool calls as chat templates read them: arguments as a dict."""
  if not isinstance(calls, list):
    raise InvalidRequestError(field, "must be a list of tool calls")
  out = []
  for j, call in enumerate(calls):
    where = f"{field}[{j}]"
    if not isinstance(call, dict):
      raise InvalidRequestError(where, "must be an object with a function")
    if call.get("type", "function") != "function":
      raise InvalidRequestError(f"{where}.type", 'must be "function"')
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
      raise InvalidRequestError(f"{where}.id", "must be a string")
    function = call.get("function")
    if not isinstance(function, dict):
      raise InvalidRequestError(f"{where}.function", "must be an object with name and arguments")
    name = function.get("name")
    if not isinstance(name, str) or not name:
      raise InvalidRequestError(f"{where}.function.name", "must be a non-empty string")
    arguments = function.get("arguments")
    if isinstance(arguments, str):  # OpenAI sends JSON text ("" for none); templates read a dict
      try:
        arguments = json.loads(arguments) if arguments.strip() else {}
      except ValueError as e:
        raise InvalidRequestError(f"{where}.function.arguments", f"is not valid JSON: {e}") \
            from None
    if not isinstance(arguments, dict):
      raise InvalidRequestError(f"{where}.function.arguments",
                                "must be a JSON object (as a string)")
    out.append({**({"id": call_id} if call_id is not None else {}), "type": "function",
                "function": {"name": name, "arguments": arguments}})
  return out


def validate_messages(messages) -> list[dict]:
  """Chat messages as {role, content} strings (OpenAI text parts joined), with what agents send
  back: an assistant's `tool_calls` (content then may be null: "") and a tool result's
  `tool_call_id`."""
  if not isinstance(messages, list) or not messages:
    raise InvalidRequestError("messages", "must be a non-empty list")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise InvalidRequestError(f"messages[{i}]", "must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in _ROLES:
      raise InvalidRequestError(f"messages[{i}].role", f"must be one of {list(_ROLES)}")
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
      raise InvalidRequestError(f"messages[{i}].tool_calls", "must be a list of tool calls or null")
    if calls and role != "assistant":
      raise InvalidRequestError(f"messages[{i}].tool_calls", "only assistant messages have them")
    calls = _tool_calls(calls, f"messages[{i}].tool_calls") if calls else None
    if calls and content is None:
      content = ""
    entry = {"role": role, "content": _text_content(content, f"messages[{i}].content")}
    if calls:
      entry["tool_calls"] = calls
    call_id = message.get("tool_call_id")
    if role == "tool" and call_id is not None:
      if not isinstance(call_id, str):
        raise InvalidRequestError(f"messages[{i}].tool_call_id", "must be a string")
      entry["tool_call_id"] = call_id
    out.append(entry)
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
