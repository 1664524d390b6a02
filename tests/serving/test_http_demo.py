"""The official `openai` client against the real block engine on a demo-style zoo: greedy text
over HTTP equals the gRPC path's, for completions and chat, streamed or not."""

import json

import openai
import pytest

from jblock.client import Client
from jblock.runtime.engine import Engine, EngineConfig
from jblock.serving import coordinator
from jblock.serving.frontend import Frontend
from jblock.serving.http import HttpServer
from jblock.train import demo

TINY = demo.DemoSpec(hidden=32, layers=4, heads=4, kv_heads=2, vocab_size=300, pretrain_steps=8,
                     finetune_steps=3, batch_size=4, seq_len=16)
PROMPTS = ["The sea", "Café naïve"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  zoo_dir = str(tmp_path_factory.mktemp("http_demo") / "zoo")
  demo.build_demo_zoo(zoo_dir, num_variants=2, progress=lambda _: None, spec=TINY)
  engine = Engine.from_zoo(zoo_dir, ["base", "variant-1", "variant-2"],
                           config=EngineConfig(batch_size=4, kv_slots=8, max_seq_len=1024,
                                               prefill_chunk=64, length_buckets=(16, 64),
                                               warmup=False))
  frontend = Frontend(engine)
  grpc_server, grpc_port = coordinator.build_server(engine, 0, frontend=frontend)
  grpc_server.start()
  http = HttpServer(frontend, 0)
  http.start()
  try:
    yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http.port}/v1"
  finally:
    http.stop()
    grpc_server.stop(0).wait(5)
    frontend.close()
    engine.close()


def test_openai_greedy_text_equals_grpc(served):
  target, base_url = served
  oa = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
  try:
    assert sorted(m.id for m in oa.models.list().data) == ["base", "variant-1", "variant-2"]
    with Client(target) as client:
      for model, prompt in (("base", PROMPTS[0]), ("variant-2", PROMPTS[0]),
                            ("variant-2", PROMPTS[1])):
        expected = client.generate_text(model, prompt, max_tokens=12, timeout=120)
        assert expected
        got = oa.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == expected, (model, prompt)
        stream = oa.completions.create(model=model, prompt=prompt, max_tokens=12, stream=True)
        assert "".join(c.choices[0].text for c in stream) == expected
      messages = [{"role": "user", "content": "Tell me about the garden"}]
      expected = client.generate_text("variant-1", messages=messages, max_tokens=10, timeout=120)
      chat = oa.chat.completions.create(model="variant-1", messages=messages, max_tokens=10)
      assert chat.choices[0].message.content == expected
      assert chat.usage.completion_tokens == 10 or chat.choices[0].finish_reason == "stop"
  finally:
    oa.close()


@pytest.fixture
def oa(served):
  client = openai.OpenAI(base_url=served[1], api_key="unused", max_retries=0, timeout=120)
  yield client
  client.close()


def test_completion_logprobs_echo_and_a_batch_of_prompts(served, oa):
  target, _ = served
  with Client(target) as client:
    expected = [client.generate_text("base", p, max_tokens=6, timeout=120) for p in PROMPTS]
  got = oa.completions.create(model="base", prompt=PROMPTS, max_tokens=6, logprobs=3)
  assert [c.index for c in got.choices] == [0, 1]
  assert [c.text for c in got.choices] == expected
  for choice in got.choices:
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
      assert value < 0 and len(top) <= 4 and token in top  # greedy: its token is the best
      assert top[token] == value == max(top.values())
  # lm-evaluation-harness's loglikelihood request: echo + logprobs, the prompt's logprobs first.
  scored = oa.completions.create(model="base", prompt=PROMPTS[0], max_tokens=1, echo=True,
                                 logprobs=1, temperature=0)
  lp = scored.choices[0].logprobs
  n_prompt = scored.usage.prompt_tokens
  assert len(lp.tokens) == n_prompt + 1 and lp.token_logprobs[0] is None
  assert scored.choices[0].text.startswith(PROMPTS[0])
  assert all(v < 0 for v in lp.token_logprobs[1:])
  only_prompt = oa.completions.create(model="base", prompt=PROMPTS[0], max_tokens=0, echo=True,
                                      logprobs=0)
  assert only_prompt.choices[0].text == PROMPTS[0] and only_prompt.usage.completion_tokens == 0
  assert only_prompt.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n_prompt]


def test_n_choices_share_the_prompt_and_are_seeded_apart(served, oa):
  args = dict(model="variant-1", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=7)
  got = oa.completions.create(n=3, logprobs=0, **args)
  assert [c.index for c in got.choices] == [0, 1, 2]
  texts = [c.text for c in got.choices]
  assert len(set(texts)) > 1  # each choice has its own seed
  assert oa.completions.create(n=1, **args).choices[0].text == texts[0]  # choice 0 keeps the seed
  streamed = {}
  for chunk in oa.completions.create(n=3, stream=True, **args):
    for c in chunk.choices:
      streamed[c.index] = streamed.get(c.index, "") + c.text
  assert [streamed[i] for i in range(3)] == texts  # the same seeds: reproducible
  # best_of generates the same three choices and returns the one with the highest logprob.
  best = oa.completions.create(n=1, best_of=3, **args)
  assert best.choices[0].text == max(got.choices,
                                     key=lambda c: sum(c.logprobs.token_logprobs)).text
  assert best.usage.completion_tokens == got.usage.completion_tokens  # all three ran


def test_chat_logprobs_streamed_and_whole(oa):
  messages = [{"role": "user", "content": "Tell me about the garden"}]
  whole = oa.chat.completions.create(model="variant-2", messages=messages, max_tokens=6,
                                     logprobs=True, top_logprobs=2)
  content = whole.choices[0].logprobs.content
  assert "".join(t.token for t in content) == whole.choices[0].message.content
  assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob and
             bytes(t.bytes) == t.token.encode() for t in content)
  streamed = []
  for chunk in oa.chat.completions.create(model="variant-2", messages=messages, max_tokens=6,
                                          logprobs=True, top_logprobs=2, stream=True):
    if chunk.choices and chunk.choices[0].logprobs:
      streamed.extend(chunk.choices[0].logprobs.content)
  assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_penalties_bias_and_extensions_reach_the_engine(oa):
  plain = oa.completions.create(model="base", prompt=PROMPTS[0], max_tokens=6)
  first = plain.choices[0].logprobs  # None: not asked
  assert first is None
  forced = oa.completions.create(model="base", prompt=PROMPTS[0], max_tokens=4,
                                 logit_bias={"65": 100}, logprobs=0)
  assert forced.choices[0].logprobs.tokens == [forced.choices[0].logprobs.tokens[0]] * 4
  penalised = oa.completions.create(model="base", prompt=PROMPTS[0], max_tokens=6,
                                    frequency_penalty=2.0, presence_penalty=2.0,
                                    extra_body={"repetition_penalty": 1.5, "min_p": 0.5,
                                                "min_tokens": 2})
  assert penalised.usage.completion_tokens >= 2


def test_grpc_logprobs_equal_the_http_ones(served, oa):
  target, _ = served
  http = oa.completions.create(model="variant-1", prompt=PROMPTS[1], max_tokens=4, logprobs=2,
                               echo=True).choices[0].logprobs
  with Client(target) as client:
    chunks = list(client.generate("variant-1", PROMPTS[1], max_tokens=4, logprobs=2,
                                  prompt_logprobs=2, timeout=120))
  prompt = chunks[0].prompt_logprobs
  out = [e for c in chunks for e in c.logprobs]
  assert prompt[0] is None and len(prompt) + len(out) == len(http.token_logprobs)
  assert [None] + [round(e[1], 5) for e in prompt[1:] + tuple(out)] == [
      None] + [round(v, 5) for v in http.token_logprobs[1:]]
  assert all(len(e[2]) == 2 for e in out)


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "maxItems": 3,
                                               "items": {"type": "string", "maxLength": 3}}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                      "inner": {"type": "object",
                                                "properties": {"x": {"type": "integer", "minimum": 0,
                                                                   "maximum": 9}},
                                                "required": ["x"], "additionalProperties": False}},
     "required": ["code", "inner"], "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"a": {"type": "null"}}, "required": ["a"],
                "additionalProperties": False},
               {"type": "object", "properties": {"b": {"enum": [1, 2]}}, "required": ["b"],
                "additionalProperties": False}]},
]


def test_json_schema_outputs_always_parse_and_validate(oa):
  import jsonschema
  outputs = []
  for i, schema in enumerate(SCHEMAS):
    got = oa.chat.completions.create(
        model="variant-1", messages=[{"role": "user", "content": "Describe it"}], max_tokens=48,
        n=10, temperature=1.0, seed=i,
        response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
    for choice in got.choices:
      assert choice.finish_reason == "stop", choice.message.content
      value = json.loads(choice.message.content)
      jsonschema.validate(value, schema)
      outputs.append(value)
  assert len(outputs) == 50 and len({json.dumps(v) for v in outputs}) > 5
  whole = oa.completions.create(model="base", prompt=PROMPTS[0], max_tokens=40, seed=1,
                                temperature=1.0,
                                extra_body={"response_format": {"type": "json_object"}})
  assert isinstance(json.loads(whole.choices[0].text), dict)
  for bad, field in (({"type": "json_schema", "json_schema": {"name": "x",
                                                              "schema": {"type": "nonsense"}}},
                      "response_format"), ({"type": "yaml"}, "response_format")):
    with pytest.raises(openai.BadRequestError) as e:
      oa.completions.create(model="base", prompt="x", max_tokens=4,
                            extra_body={"response_format": bad})
    assert e.value.body["param"].startswith(field)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1,
                                                             "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}


def test_required_tools_come_back_as_calls_whose_arguments_follow_the_schema(oa):
  import jsonschema
  messages = [{"role": "user", "content": "Weather in Paris?"}]
  got = oa.chat.completions.create(model="variant-2", messages=messages, tools=[WEATHER],
                                   tool_choice="required", max_tokens=100, temperature=0,
                                   parallel_tool_calls=False)
  choice = got.choices[0]
  assert choice.finish_reason == "tool_calls" and choice.message.content is None
  [call] = choice.message.tool_calls
  assert call.type == "function" and call.function.name == "get_weather"
  jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
  named = oa.chat.completions.create(
      model="variant-2", messages=messages, tools=[WEATHER], max_tokens=100, temperature=0,
      tool_choice={"type": "function", "function": {"name": "get_weather"}})
  assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
  # Streamed: OpenAI's tool-call deltas assemble into the same call.
  name, arguments, finish = "", "", None
  for chunk in oa.chat.completions.create(model="variant-2", messages=messages, tools=[WEATHER],
                                          tool_choice="required", max_tokens=100, temperature=0,
                                          parallel_tool_calls=False, stream=True):
    for c in chunk.choices:
      for delta in c.delta.tool_calls or ():
        name += delta.function.name or ""
        arguments += delta.function.arguments or ""
      finish = c.finish_reason or finish
  assert (name, json.loads(arguments), finish) == (
      "get_weather", json.loads(call.function.arguments), "tool_calls")
  with pytest.raises(openai.BadRequestError) as e:
    oa.chat.completions.create(model="variant-2", messages=messages, tools=[WEATHER],
                               tool_choice={"type": "function", "function": {"name": "nope"}})
  assert e.value.body["param"].startswith("tool_choice")


def test_n_choices_compute_the_prompt_once_and_only_their_last_page_again(served, oa):
  target, _ = served
  prompt = "On a clear night the garden and the sea were quiet, " * 4
  with Client(target) as client:
    def prompt_tokens_computed() -> int:
      computed = client.stats()["prefix_cache"]["computed_tokens"]
      return max([c["prompt"] for c in computed.values()] + [0])  # the embed: every chunk

    # Compiles this length's shapes first: a waiting choice gives up after 5 s (a compile).
    oa.completions.create(model="variant-2", prompt=prompt.upper(), max_tokens=2)
    before = prompt_tokens_computed()
    got = oa.completions.create(model="variant-2", prompt=prompt, max_tokens=2, n=4,
                                temperature=1.0, seed=3)
    computed = prompt_tokens_computed() - before
  length, page = got.usage.prompt_tokens, 16  # EngineConfig's default page size
  assert length > 3 * page
  # Choice 0 computes the whole prompt; the others adopt its full pages and compute only the
  # tokens after the last full page boundary below the prompt's end (at least its last token).
  tail = length - (length - 1) // page * page
  assert computed == length + 3 * tail < 4 * length, (computed, length)
