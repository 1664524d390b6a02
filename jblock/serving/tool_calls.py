"""OpenAI function calling (`tools`, `tool_choice`) on the host side: checks, parsers, forcing.

A model calls tools in its own text convention. parse_tools checks a request's tools (a 400
names the field, e.g. `tools[2].function.name`; the legacy `functions`/`function_call` are
refused, not converted: their replies have another shape, which this server does not produce);
prompts.ModelText.chat_text(..., tools=) renders them; extract, or ToolCallStream delta by delta
(same result however the text is split), turns the output back into OpenAI `tool_calls`. For
tool_choice "required" or a named function, forced_call_format gives a response_format
(json_schema) confining the output to the call(s), as vLLM does; parse_forced reads it back.

Parsers (the server's --tool_call_parser):
  hermes (default)  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, any number,
                    the text outside them being the content (Qwen2.5, Hermes, prompts.py's
                    default template). A block still open at the end counts if its JSON is whole.
  llama3_json       Llama 3.x: the whole output (optionally after <|python_tag|>) is
                    `{"name": ..., "parameters": {...}}` ("arguments" too), several separated by
                    `;`. All or nothing: anything else in the output makes it all content.
Malformed JSON in a call is left as content (never raised); whitespace before a call or after
the last one is dropped. Calls stream whole (a header delta, then the arguments): a call is only
known well-formed once it closes. A response with tool calls has finish_reason "tool_calls"
(TOOL_CALLS_FINISH_REASON): the HTTP layer decides from extract's calls or ToolCallStream.calls.
"""

import dataclasses
import json
import re
import secrets

from jblock.errors import InvalidRequestError

MAX_TOOLS = 128
TOOL_CALL_PARSERS = ("hermes", "llama3_json")
DEFAULT_TOOL_CALL_PARSER = "hermes"
TOOL_CALLS_FINISH_REASON = "tool_calls"
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_SPACE = " \t\r\n"
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_SEPARATOR = re.compile(r"[ \t\r\n]*(;[ \t\r\n]*)?")  # between Llama 3 calls
# A function without parameters takes an empty object (what OpenAI assumes too).
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One call as OpenAI returns it: `arguments` is the JSON text of an object."""
  name: str
  arguments: str
  id: str = dataclasses.field(default_factory=lambda: "call_" + secrets.token_hex(12))

  def to_openai(self) -> dict:
    return {"id": self.id, "type": "function",
            "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class ToolSpec:
  """A request's validated tools and choice: "none" (tools shown to the model, its output not
  parsed), "auto", "required", or "function" (`function_name` must be called)."""
  tools: tuple[dict, ...]
  choice: str
  function_name: str | None = None
  parallel_tool_calls: bool = True

  @property
  def template_tools(self) -> list[dict]:
    """The OpenAI tool dicts for chat_text(tools=...)."""
    return list(self.tools)

  @property
  def forces_call(self) -> bool:
    return self.choice in ("required", "function")


def _check_function(function, field: str) -> dict:
  if not isinstance(function, dict):
    raise InvalidRequestError(field, "must be an object with a name")
  name = function.get("name")
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise InvalidRequestError(f"{field}.name", "must be 1-64 letters, digits, _ or -")
  out = {"name": name}
  for key, kind, wanted in (("description", str, "a string"), ("strict", bool, "true or false"),
                            ("parameters", dict, "a JSON Schema object")):
    if function.get(key) is not None:
      if not isinstance(function[key], kind):
        raise InvalidRequestError(f"{field}.{key}", f"must be {wanted}")
      out[key] = function[key]
  # Arguments reach chat templates as a dict: the schema must describe an object.
  if out.get("parameters", {}).get("type", "object") != "object":
    raise InvalidRequestError(f"{field}.parameters", 'must describe an object (type "object")')
  return out


def _check_tools(tools) -> tuple[dict, ...]:
  if not isinstance(tools, list):
    raise InvalidRequestError("tools", "must be a list of tools")
  if len(tools) > MAX_TOOLS:
    raise InvalidRequestError("tools", f"at most {MAX_TOOLS} tools")
  out, seen = [], {}
  for i, tool in enumerate(tools):
    if not isinstance(tool, dict):
      raise InvalidRequestError(f"tools[{i}]", 'must be an object {"type": "function", ...}')
    if tool.get("type") != "function":
      raise InvalidRequestError(f"tools[{i}].type", 'must be "function"')
    function = _check_function(tool.get("function"), f"tools[{i}].function")
    if function["name"] in seen:
      raise InvalidRequestError(f"tools[{i}].function.name",
                                f"{function['name']!r} is also tools[{seen[function['name']]}]")
    seen[function["name"]] = i
    out.append({"type": "function", "function": function})
  return tuple(out)


def parse_tools(tools, tool_choice=None, *, parallel_tool_calls=None, functions=None,
                function_call=None) -> ToolSpec | None:
  """A request's tool fields as a ToolSpec, None when it brings no tools.

  tool_choice defaults to "auto" with tools and "none" without. The legacy `functions` and
  `function_call` are refused (400) rather than converted (see the module docstring)."""
  for legacy, value in (("functions", functions), ("function_call", function_call)):
    if value not in (None, [], {}, ""):
      raise InvalidRequestError(legacy, "the legacy functions API is not supported: send "
                                "`tools` and `tool_choice` instead")
  if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
    raise InvalidRequestError("parallel_tool_calls", "must be true or false")
  checked = _check_tools(tools) if tools is not None else ()
  function_name = None
  if tool_choice is None:
    choice = "auto" if checked else "none"
  elif not isinstance(tool_choice, dict):
    if tool_choice not in ("none", "auto", "required"):
      raise InvalidRequestError("tool_choice", 'must be "none", "auto", "required" or '
                                '{"type": "function", "function": {"name": ...}}')
    choice = tool_choice
  else:
    if tool_choice.get("type") != "function":
      raise InvalidRequestError("tool_choice.type", 'must be "function"')
    function = tool_choice.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
      raise InvalidRequestError("tool_choice.function", 'must be {"name": ...}')
    function_name = function["name"]
    if function_name not in {tool["function"]["name"] for tool in checked}:
      raise InvalidRequestError("tool_choice.function.name",
                                f"{function_name!r} is not one of the request's tools")
    choice = "function"
  if not checked:
    if choice in ("auto", "required"):
      raise InvalidRequestError("tool_choice", f'"{choice}" needs tools')
    return None
  return ToolSpec(checked, choice, function_name, parallel_tool_calls is not False)


def _no_constants(name: str):
  raise ValueError(f"{name} is not JSON")  # NaN/Infinity would not round-trip to clients


_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def _json_or_none(text: str):
  try:
    return _DECODER.decode(text)
  except ValueError:
    return None


def _call_from(value) -> tuple[str, str] | None:
  """(name, arguments JSON) from {"name", "arguments" | "parameters"}, None if not a call."""
  name = value.get("name") if isinstance(value, dict) else None
  if not isinstance(name, str) or not name:
    return None
  arguments = value["arguments"] if "arguments" in value else value.get("parameters")
  if isinstance(arguments, str):  # some models write the arguments as a JSON string
    arguments = _json_or_none(arguments)
  elif arguments is None:
    arguments = {}
  if not isinstance(arguments, dict):
    return None
  return name, json.dumps(arguments, ensure_ascii=False)


def _llama3_calls(text: str) -> list[tuple[str, str]]:
  """All the calls `text` is made of, or [] when any of it is something else."""
  text = text.strip(_SPACE)
  if text.startswith(_PYTHON_TAG):
    text = text[len(_PYTHON_TAG):].lstrip(_SPACE)
  calls, position = [], 0
  while position < len(text):
    try:
      value, end = _DECODER.raw_decode(text, position)
    except ValueError:
      return []
    call, separator = _call_from(value), _SEPARATOR.match(text, end)
    if call is None or (separator.end() < len(text) and not separator.group(1)):
      return []
    calls.append(call)
    position = separator.end()
  return calls


def _partial_opener(text: str, opener: str) -> int:
  """Length of the longest end of `text` that begins `opener` (held back: it may be one)."""
  return next((size for size in range(min(len(opener) - 1, len(text)), 0, -1)
               if opener.startswith(text[-size:])), 0)


# --- scanners: text in, events out: ("content", text) and ("call", name, arguments JSON)

class _HermesScanner:
  """<tool_call> blocks: content streams on, holding back what may begin an opener."""

  def __init__(self):
    self._buffer, self._in_call, self._found_call = "", False, False
    self._searched = 0  # how far into _buffer the closing tag was looked for
    self._held_space = ""  # whitespace after content: not content if a call follows

  def _content(self, text: str, events: list) -> None:
    text = self._held_space + text
    head = text.rstrip(_SPACE)
    self._held_space = text[len(head):]
    if head:
      events.append(("content", head))

  def _close(self, body: str, closer: str, events: list) -> None:
    self._in_call = False
    call = _call_from(_json_or_none(body))
    if call is None:
      self._content(_HERMES_OPEN + body + closer, events)
    else:
      self._held_space, self._found_call = "", True
      events.append(("call", *call))

  def feed(self, text: str) -> list[tuple]:
    self._buffer += text
    events = []
    while True:
      if self._in_call:
        end = self._buffer.find(_HERMES_CLOSE, self._searched)
        if end < 0:
          self._searched = max(0, len(self._buffer) - len(_HERMES_CLOSE) + 1)
          return events
        body, self._buffer = self._buffer[:end], self._buffer[end + len(_HERMES_CLOSE):]
        self._close(body, _HERMES_CLOSE, events)
      else:
        start = self._buffer.find(_HERMES_OPEN)
        if start < 0:
          safe = len(self._buffer) - _partial_opener(self._buffer, _HERMES_OPEN)
          self._content(self._buffer[:safe], events)
          self._buffer = self._buffer[safe:]
          return events
        self._content(self._buffer[:start], events)
        self._buffer = self._buffer[start + len(_HERMES_OPEN):]
        self._in_call, self._searched = True, 0

  def finish(self) -> list[tuple]:
    events = []
    if self._in_call:  # an unclosed block: a call if its JSON is whole (a stop string ate the tag)
      self._close(self._buffer, "", events)
    else:
      self._content(self._buffer, events)
    if self._held_space and not self._found_call:
      events.append(("content", self._held_space))
    self._buffer, self._held_space = "", ""
    return events


class _WholeScanner:
  """An output all calls or all content: held while it may be calls (may_be_calls(start) says
  True, False or None: not yet known), read at the end."""

  def __init__(self, may_be_calls, read_calls):
    self._may_be_calls, self._read_calls = may_be_calls, read_calls
    self._buffer, self._holding = "", None

  def feed(self, text: str) -> list[tuple]:
    self._buffer += text
    if self._holding is None:
      self._holding = self._may_be_calls(self._buffer)
    if self._holding is not False:
      return []
    text, self._buffer = self._buffer, ""
    return [("content", text)] if text else []

  def finish(self) -> list[tuple]:
    text, self._buffer = self._buffer, ""
    calls = self._read_calls(text) if self._holding is not False else []
    if calls:
      return [("call", *call) for call in calls]
    return [("content", text)] if text else []


def _llama3_may_be_calls(start: str) -> bool | None:
  start = start.lstrip(_SPACE)
  if start.startswith(("{", _PYTHON_TAG)):
    return True
  return None if _PYTHON_TAG.startswith(start) else False  # "" or a partial tag: not yet known


def _scanner(parser: str, spec: ToolSpec | None):
  if parser not in TOOL_CALL_PARSERS:  # a server flag's value, not a request's
    raise ValueError(f"unknown tool call parser {parser!r}: one of {list(TOOL_CALL_PARSERS)}")
  if spec is not None and spec.choice == "none":
    return _WholeScanner(lambda start: False, None)
  if spec is not None and spec.forces_call:
    return _WholeScanner(lambda start: True, lambda text: [
        (call.name, call.arguments) for call in parse_forced(text, spec)])
  if parser == "llama3_json":
    return _WholeScanner(_llama3_may_be_calls, _llama3_calls)
  return _HermesScanner()


class ToolCallStream:
  """One choice's output as OpenAI chat-chunk `delta` dicts; `calls` lists the calls so far.
  No spec or "auto" parses with `parser`; "none" passes text through; forced calls are read
  from the whole output at finish()."""

  def __init__(self, parser: str = DEFAULT_TOOL_CALL_PARSER, spec: ToolSpec | None = None):
    self._scanner = _scanner(parser, spec)
    self._parallel = spec is None or spec.parallel_tool_calls
    self.calls: list[ToolCall] = []

  def feed(self, text: str) -> list[dict]:
    return self._deltas(self._scanner.feed(text))

  def finish(self) -> list[dict]:
    return self._deltas(self._scanner.finish())

  def _deltas(self, events: list[tuple]) -> list[dict]:
    deltas = []
    for event in events:
      if event[0] == "content":
        deltas.append({"content": event[1]})
        continue
      if self.calls and not self._parallel:
        continue  # parallel_tool_calls false: the first call only
      call = ToolCall(event[1], event[2])
      index = len(self.calls)
      self.calls.append(call)
      deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                     "function": {"name": call.name, "arguments": ""}}]})
      deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
    return deltas


def extract(text: str, parser: str = DEFAULT_TOOL_CALL_PARSER, spec: ToolSpec | None = None
            ) -> tuple[str | None, list[ToolCall]]:
  """A whole output as (content, calls); content is None when there are calls and no text."""
  stream = ToolCallStream(parser, spec)
  deltas = stream.feed(text) + stream.finish()
  content = "".join(delta["content"] for delta in deltas if "content" in delta)
  return (None if stream.calls and not content else content), stream.calls


# --- forced calls through structured output

def _call_schema(tool: dict) -> dict:
  function = tool["function"]
  return {"type": "object",
          "properties": {"name": {"type": "string", "enum": [function["name"]]},
                         "arguments": function.get("parameters", _NO_PARAMETERS)},
          "required": ["name", "arguments"], "additionalProperties": False}


def forced_call_format(spec: ToolSpec | None) -> dict | None:
  """The response_format that makes the output the forced call(s), None if none is forced.

  A named function: one {"name", "arguments"} object. "required": a JSON array (at least one
  item; one at most without parallel calls) of such objects for any of the tools."""
  if spec is None or not spec.forces_call:
    return None
  if spec.choice == "function":
    schema = _call_schema(next(tool for tool in spec.tools
                               if tool["function"]["name"] == spec.function_name))
  else:
    schema = {"type": "array", "minItems": 1,
              "items": {"anyOf": [_call_schema(tool) for tool in spec.tools]}}
    if not spec.parallel_tool_calls:
      schema["maxItems"] = 1
  return {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": schema}}


def parse_forced(text: str, spec: ToolSpec | None) -> list[ToolCall]:
  """The calls in an output constrained by forced_call_format; [] if it is not such JSON."""
  if spec is None or not spec.forces_call:
    return []
  value = _json_or_none(text)
  if spec.choice == "function":
    items, allowed = [value], {spec.function_name}
  else:
    items = value if isinstance(value, list) else []
    allowed = {tool["function"]["name"] for tool in spec.tools}
  calls = [ToolCall(*call) for call in map(_call_from, items) if call and call[0] in allowed]
  return calls if spec.parallel_tool_calls else calls[:1]


__all__ = ["DEFAULT_TOOL_CALL_PARSER", "MAX_TOOLS", "TOOL_CALLS_FINISH_REASON",
           "TOOL_CALL_PARSERS", "ToolCall", "ToolCallStream", "ToolSpec", "extract",
           "forced_call_format", "parse_forced", "parse_tools"]
