"""OpenAI tools on the host side: request checks, chat messages with tool calls, the default
template's tool rendering, the hermes / llama3_json parsers (whole and streamed on random
splits), and forced calls through a response_format schema. Pure Python, no model weights."""

import json
import random
import re
import shutil

import pytest

from jblock.errors import InvalidRequestError
from jblock.serving.prompts import DEFAULT_CHAT_TEMPLATE, ModelText, validate_messages
from jblock.serving.tool_calls import (ToolCall, ToolCallStream, ToolSpec, extract,
                                       forced_call_format, parse_forced, parse_tools)

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}},
                      "required": ["city"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL_ID = re.compile(r"call_[0-9a-f]{24}")
# The default template before tools: plain messages must still render exactly as it did.
PLAIN_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
                  "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, '
    '"required": ["city"]}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n')
AGENT_TURN = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
AGENT_TURN_TEXT = (
    "user: Weather in Paris?\nassistant: <tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    'tool: <tool_response>\n{"temp_c": 21}\n</tool_response>\nassistant:')


def _render(messages, tools=None, template=DEFAULT_CHAT_TEMPLATE):
  from transformers.utils.chat_template_utils import render_jinja_template
  rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template,
                                      add_generation_prompt=True)
  return rendered[0]


def _field(call, *args, **kwargs) -> str:
  with pytest.raises(InvalidRequestError) as raised:
    call(*args, **kwargs)
  return raised.value.field


# --- parse_tools

def test_parse_tools_normalises_and_defaults():
  assert parse_tools(None) is None
  assert parse_tools(None, "none") is None
  assert parse_tools([], None) is None
  extra = {**WEATHER, "function": {**WEATHER["function"], "strict": True, "unknown": 1}}
  spec = parse_tools([extra, TIME], None)
  assert spec == ToolSpec(
      ({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": WEATHER_PARAMETERS, "strict": True}},
       {"type": "function", "function": {"name": "get_time"}}), "auto", None, True)
  assert not spec.forces_call
  assert spec.template_tools == list(spec.tools)
  assert parse_tools([TIME], "none").choice == "none"
  assert parse_tools([TIME], "required").forces_call
  named = parse_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}},
                      parallel_tool_calls=False)
  assert (named.choice, named.function_name, named.parallel_tool_calls) == (
      "function", "get_time", False)


@pytest.mark.parametrize("tools, tool_choice, extra, field", [
    ({"a": 1}, None, {}, "tools"),
    ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], None, {}, "tools"),
    ([TIME, "x"], None, {}, "tools[1]"),
    ([TIME, {"type": "retrieval"}], None, {}, "tools[1].type"),
    ([{"type": "function"}], None, {}, "tools[0].function"),
    ([TIME, TIME, {"type": "function", "function": {"name": "has space"}}], None, {},
     "tools[1].function.name"),
    ([TIME, WEATHER, {"type": "function", "function": {"name": "has space"}}], None, {},
     "tools[2].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, {}, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], None, {},
     "tools[0].function.description"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, {},
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None, {},
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], None, {},
     "tools[0].function.strict"),
    ([TIME], "sometimes", {}, "tool_choice"),
    ([TIME], 3, {}, "tool_choice"),
    ([TIME], {"type": "tool", "function": {"name": "get_time"}}, {}, "tool_choice.type"),
    ([TIME], {"type": "function"}, {}, "tool_choice.function"),
    ([TIME], {"type": "function", "function": {"name": "get_weather"}}, {},
     "tool_choice.function.name"),
    (None, "required", {}, "tool_choice"),
    (None, "auto", {}, "tool_choice"),
    (None, {"type": "function", "function": {"name": "f"}}, {}, "tool_choice.function.name"),
    ([TIME], None, {"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    (None, None, {"functions": [{"name": "f"}]}, "functions"),
    ([TIME], None, {"function_call": "auto"}, "function_call"),
])
def test_parse_tools_names_the_bad_field(tools, tool_choice, extra, field):
  assert _field(parse_tools, tools, tool_choice, **extra) == field


def test_unknown_parser_is_refused():
  with pytest.raises(ValueError, match="hermes"):
    ToolCallStream("mistral")


# --- chat messages and the default template

def test_validate_messages_keeps_tool_calls_with_parsed_arguments():
  validated = validate_messages(AGENT_TURN)
  assert validate_messages(validated) == validated  # the frontend may check twice
  assert validate_messages(AGENT_TURN + [
      {"role": "assistant", "content": [{"type": "text", "text": "Checking."}], "tool_calls": [
          {"type": "function", "function": {"name": "get_time", "arguments": ""}},
          {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
      {"role": "user", "content": "thanks", "tool_calls": []}]) == [
      {"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"id": "call_1", "type": "function",
           "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_1"},
      {"role": "assistant", "content": "Checking.", "tool_calls": [
          {"type": "function", "function": {"name": "get_time", "arguments": {}}},
          {"type": "function",
           "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
      {"role": "user", "content": "thanks"}]


def _call(**function):
  return [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                "function": function}]}]


@pytest.mark.parametrize("messages, field", [
    ([{"role": "user", "content": "x"}, *_call(name="f", arguments="{not json")],
     "messages[1].tool_calls[0].function.arguments"),
    (_call(name="f", arguments="[1, 2]"), "messages[0].tool_calls[0].function.arguments"),
    (_call(name="", arguments="{}"), "messages[0].tool_calls[0].function.name"),
    ([{"role": "assistant", "tool_calls": {"id": "c"}}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": ["f"]}], "messages[0].tool_calls[0]"),
    ([{"role": "assistant", "tool_calls": [{"type": "code", "function": {}}]}],
     "messages[0].tool_calls[0].type"),
    ([{"role": "assistant", "tool_calls": [{"id": 7, "function": {}}]}],
     "messages[0].tool_calls[0].id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c"}]}], "messages[0].tool_calls[0].function"),
    ([{"role": "user", "content": "x", "tool_calls": _call(name="f")[0]["tool_calls"]}],
     "messages[0].tool_calls"),
    ([{"role": "assistant", "content": None}], "messages[0].content"),
    ([{"role": "tool", "content": "r", "tool_call_id": 3}], "messages[0].tool_call_id"),
    ([{"role": "tool", "tool_call_id": "c"}], "messages[0].content"),
    ([{"role": "function", "name": "f", "content": "r"}], "messages[0].role"),
])
def test_validate_messages_names_the_bad_field(messages, field):
  assert _field(validate_messages, messages) == field


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": " terse \n"}, {"role": "user", "content": "a\nb"},
     {"role": "assistant", "content": ""}, {"role": "tool", "content": "42"},
     {"role": "developer", "content": "{{ not jinja }}"}],
])
def test_default_template_renders_plain_messages_as_before(messages):
  messages = validate_messages(messages)
  assert _render(messages) == _render(messages, template=PLAIN_TEMPLATE)
  assert _render(messages, tools=[]) == _render(messages, template=PLAIN_TEMPLATE)


def test_default_template_renders_tools_calls_and_results():
  tools = parse_tools([WEATHER], None).template_tools
  system = [{"role": "system", "content": "You are terse."}]
  assert _render(validate_messages(system + AGENT_TURN), tools) == (
      "system: You are terse.\n\n" + TOOLS_PREAMBLE + AGENT_TURN_TEXT)
  assert _render(validate_messages(AGENT_TURN), tools) == (
      "system: " + TOOLS_PREAMBLE + AGENT_TURN_TEXT)
  # Without tools the calls and results still render in the convention; content comes first.
  two_calls = validate_messages([{"role": "assistant", "content": "On it.", "tool_calls": [
      {"function": {"name": "get_time", "arguments": "{}"}},
      {"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}])
  assert _render(two_calls) == (
      'assistant: On it.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
      "assistant:")


def test_chat_text_passes_tools_to_the_template(tmp_path, catalog, tokenizer, tokenizer_dir):
  tools = parse_tools([WEATHER], None).template_tools
  messages = validate_messages(AGENT_TURN)
  demo = ModelText(catalog["mock-a"], tokenizer, 1 << 20)  # no template: the default one
  assert demo.chat_text(messages, tools=tools) == "system: " + TOOLS_PREAMBLE + AGENT_TURN_TEXT
  assert demo.chat_text(messages[:1]) == "user: Weather in Paris?\nassistant:"
  # A model's own template gets the tools and the arguments as a dict, as in Qwen2.5's.
  own_dir = tmp_path / "own"
  shutil.copytree(tokenizer_dir, own_dir)
  template = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
              "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
              "{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %}"
              "{% endfor %}")
  (own_dir / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": template, "eos_token": "<eos>",
       "tokenizer_class": "PreTrainedTokenizerFast"}))
  info = catalog["mock-a"]
  own = ModelText(type(info)("own", "mock", info.vocab_size, info.max_seq_len, info.chain,
                             tokenizer_dir=str(own_dir)), tokenizer, 1 << 20)
  assert own.chat_text(messages, tools=tools) == (
      '[get_weather]<user>Weather in Paris?<assistant>{"city": "Paris"}<tool>{"temp_c": 21}')


# --- parsers

def _calls(calls):
  assert all(CALL_ID.fullmatch(call.id) for call in calls)
  return [(call.name, json.loads(call.arguments)) for call in calls]


HERMES_CASES = [
    # (model output, content, [(name, arguments)])
    ("Just text.", "Just text.", []),
    ("", "", []),
    ("  spaced out \n", "  spaced out \n", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>\n<tool_call>{"arguments": {}, "name": "get_time"}</tool_call>\n',
     "Let me check.", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}</tool_call> and then text',
     " and then text", [("f", {"x": [1, 2]})]),
    ('<tool_call>{"name": "f", "parameters": {"ü": "é"}}</tool_call>', None,
     [("f", {"ü": "é"})]),
    ('<tool_call>{"name": "f"}</tool_call>', None, [("f", {})]),
    # Malformed blocks stay as content, verbatim (and the whitespace before them too).
    ('a <tool_call>{"name": "f", "arguments": {</tool_call> b',
     'a <tool_call>{"name": "f", "arguments": {</tool_call> b', []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', []),
    ('ok <tool_call>{"name": "f", "arguments": {}}</tool_call> <tool_call>oops</tool_call>',
     "ok <tool_call>oops</tool_call>", [("f", {})]),
    # An unclosed block at the end: a call if its JSON is whole, else content.
    ('Sure: <tool_call>{"name": "f", "arguments": {"a": 1}}\n', "Sure:", [("f", {"a": 1})]),
    ('Sure: <tool_call>{"name": "f", "arguments": {"a": 1', 'Sure: <tool_call>{"name": "f", '
     '"arguments": {"a": 1', []),
    ("ends with <tool_c", "ends with <tool_c", []),
    ("a < b <tool <tool_call", "a < b <tool <tool_call", []),
]


@pytest.mark.parametrize("text, content, calls", HERMES_CASES)
def test_hermes_extract(text, content, calls):
  got_content, got_calls = extract(text)
  assert (got_content, _calls(got_calls)) == (content, calls)


LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "f", "arguments": {"a": 1}}; {"name": "g", "parameters": {}};\n',
     None, [("f", {"a": 1}), ("g", {})]),
    (' \n{"name": "f", "parameters": null}', None, [("f", {})]),
    ('{"name": "f", "parameters": {}} trailing words',
     '{"name": "f", "parameters": {}} trailing words', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "f", "parameters": {"a": ', '{"name": "f", "parameters": {"a": ', []),
    ("The answer is {\"name\": 1}", "The answer is {\"name\": 1}", []),
    ("<|python_tag|>", "<|python_tag|>", []),
    ("  ", "  ", []),
]


@pytest.mark.parametrize("text, content, calls", LLAMA_CASES)
def test_llama3_json_extract(text, content, calls):
  got_content, got_calls = extract(text, "llama3_json")
  assert (got_content, _calls(got_calls)) == (content, calls)


def test_tool_call_to_openai():
  call = ToolCall("f", '{"a": 1}')
  assert call.to_openai() == {"id": call.id, "type": "function",
                              "function": {"name": "f", "arguments": '{"a": 1}'}}
  assert ToolCall("f", "{}").id != call.id


def _streamed(text, parser, spec=None, rng=None):
  """Feeds `text` in random pieces; returns (content, [(id, name, arguments)], deltas)."""
  stream = ToolCallStream(parser, spec)
  deltas, position = [], 0
  while position < len(text):
    size = rng.choice([1, 1, 2, 3, 5, 11, 40]) if rng else len(text)
    deltas += stream.feed(text[position:position + size])
    position += size
  deltas += stream.finish()
  content, calls = "", {}
  for delta in deltas:
    assert len(delta) == 1 and (delta.get("content") or delta.get("tool_calls"))
    content += delta.get("content", "")
    for piece in delta.get("tool_calls", ()):
      if "id" in piece:
        assert piece["index"] == len(calls) and piece["type"] == "function"
        assert piece["function"]["arguments"] == ""
        calls[piece["index"]] = [piece["id"], piece["function"]["name"], ""]
      else:
        calls[piece["index"]][2] += piece["function"]["arguments"]
  assert [c[0] for c in calls.values()] == [c.id for c in stream.calls]
  return content, [tuple(c[1:]) for c in calls.values()], deltas


@pytest.mark.parametrize("parser, cases", [("hermes", HERMES_CASES), ("llama3_json", LLAMA_CASES)])
def test_streaming_equals_extract_on_random_splits(parser, cases):
  rng = random.Random(0)
  for text, _, _ in cases:
    content, calls = extract(text, parser)
    want = (content or "", [(call.name, call.arguments) for call in calls])
    for _ in range(60):
      assert _streamed(text, parser, rng=rng)[:2] == want, text


CALL_TEXTS = ['{"name": "f", "arguments": {"a": "<b>"}}', '{"name": "g", "parameters": {}}']
FRAGMENTS = {
    "hermes": ["Hi", " ", "\n", "<", "<tool", "<tool_call>", "</tool_call>", "{", "}", "é",
               '<tool_call>{"name": "h", "arguments": {"x": 1}}</tool_call>', '{"name": "bad"',
               *CALL_TEXTS],
    "llama3_json": [" ", "\n", ";", "; ", "<|python_tag|>", "<|py", "x", '{"name": "bad"',
                    *CALL_TEXTS * 3]}


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_streaming_equals_extract_on_random_texts(parser):
  rng = random.Random(2)
  for _ in range(300):
    text = "".join(rng.choice(FRAGMENTS[parser]) for _ in range(rng.randint(0, 8)))
    content, calls = extract(text, parser)
    want = (content or "", [(call.name, call.arguments) for call in calls])
    for _ in range(4):
      assert _streamed(text, parser, rng=rng)[:2] == want, text


def test_hermes_stream_deltas_and_held_opener():
  text = 'Hi <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
  stream = ToolCallStream()
  deltas = [stream.feed(ch) for ch in text]
  # The space and the opener's characters are held, never sent as content.
  assert deltas[:2] == [[{"content": "H"}], [{"content": "i"}]] and not any(deltas[2:-1])
  call_id = stream.calls[0].id
  assert deltas[-1] == [
      {"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                       "function": {"name": "f", "arguments": ""}}]},
      {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}]
  assert stream.finish() == []
  # A held partial opener that turns out to be text is flushed as content.
  stream = ToolCallStream()
  assert stream.feed("x <tool") == [{"content": "x"}]
  assert stream.feed("s> y") == [{"content": " <tools> y"}]
  assert stream.finish() == []


def test_llama3_json_stream_holds_only_what_may_be_a_call():
  stream = ToolCallStream("llama3_json")
  assert stream.feed(" \n") == [] and stream.feed("Hello") == [{"content": " \nHello"}]
  assert stream.feed(" {") == [{"content": " {"}] and stream.finish() == []
  stream = ToolCallStream("llama3_json")
  assert stream.feed('<|python_tag|>{"name": "f", "parameters": {}}') == []
  assert stream.finish()[1] == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}


def test_spec_choice_none_and_parallel_false():
  text = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g"}</tool_call>'
  assert extract(text, spec=parse_tools([TIME], "none")) == (text, [])
  content, calls = extract(text, spec=parse_tools([TIME], "auto", parallel_tool_calls=False))
  assert (content, _calls(calls)) == (None, [("f", {})])


# --- forced calls

def _schema(response_format):
  return response_format["json_schema"]["schema"]


def test_forced_call_format_for_a_named_function():
  spec = parse_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
  assert forced_call_format(spec) == {"type": "json_schema", "json_schema": {
      "name": "tool_calls", "schema": {
          "type": "object",
          "properties": {"name": {"type": "string", "enum": ["get_weather"]},
                         "arguments": WEATHER_PARAMETERS},
          "required": ["name", "arguments"], "additionalProperties": False}}}
  output = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
  assert _calls(parse_forced(output, spec)) == [("get_weather", {"city": "Paris"})]
  assert parse_forced('{"name": "get_weather", "arguments": {"city": "Par', spec) == []
  assert parse_forced('{"name": "get_time", "arguments": {}}', spec) == []
  content, calls = extract(output, spec=spec)
  assert (content, _calls(calls)) == (None, [("get_weather", {"city": "Paris"})])
  assert extract("not json", spec=spec) == ("not json", [])


def test_forced_call_format_for_required():
  spec = parse_tools([WEATHER, TIME], "required")
  time_schema = {"type": "object",
                 "properties": {"name": {"type": "string", "enum": ["get_time"]},
                                "arguments": {"type": "object", "properties": {}}},
                 "required": ["name", "arguments"], "additionalProperties": False}
  assert _schema(forced_call_format(spec)) == {
      "type": "array", "minItems": 1,
      "items": {"anyOf": [_schema(forced_call_format(parse_tools(
          [WEATHER], {"type": "function", "function": {"name": "get_weather"}}))), time_schema]}}
  assert _schema(forced_call_format(parse_tools([TIME], "required", parallel_tool_calls=False)))[
      "maxItems"] == 1
  output = ('[{"name": "get_time", "arguments": {}}, '
            '{"name": "get_weather", "arguments": {"city": "Oslo"}}]')
  assert _calls(parse_forced(output, spec)) == [("get_time", {}), ("get_weather", {"city": "Oslo"})]
  assert parse_forced('{"name": "get_time", "arguments": {}}', spec) == []
  assert parse_forced("[", spec) == []
  assert forced_call_format(None) is None
  assert forced_call_format(parse_tools([TIME], "auto")) is None
  assert parse_forced(output, parse_tools([TIME], "auto")) == []
  # Streamed, the forced JSON is read at the end, whatever the split.
  rng = random.Random(1)
  for _ in range(20):
    content, calls, _ = _streamed(output, "hermes", spec, rng)
    assert (content, calls) == ("", [("get_time", "{}"), ("get_weather", '{"city": "Oslo"}')])


def test_forced_schemas_are_json_schema_and_accept_the_examples():
  jsonschema = pytest.importorskip("jsonschema")  # not a project dependency: checked if present
  named = forced_call_format(parse_tools(
      [WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}))
  required = forced_call_format(parse_tools([WEATHER, TIME], "required"))
  for response_format, good, bad in (
      (named, {"name": "get_weather", "arguments": {"city": "Paris"}},
       {"name": "get_time", "arguments": {}}),
      (required, [{"name": "get_time", "arguments": {}}], [])):
    jsonschema.Draft202012Validator.check_schema(_schema(response_format))
    validator = jsonschema.Draft202012Validator(_schema(response_format))
    assert validator.is_valid(good) and not validator.is_valid(bad)
