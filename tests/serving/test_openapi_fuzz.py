"""Schemathesis fuzzing of the generation routes against the server's own /openapi.json.

The document's request bodies (jblock.serving.openai_schema) only describe what openai_requests
and the engine check, so this is where the two are held together. Per route: schemathesis's
coverage cases (each field at and past its bounds, of each wrong type, missing), then
Hypothesis-drawn bodies, schema-valid (positive) and breaking one rule (negative). Every answer
must be documented and conform to its schema, never a 5xx, and a negative body must be refused.
Streamed answers are read event by event (schemathesis hangs up after 20), each `data:`
validated against the chunk schema. Afterwards the server is idle: health 200, no KV leased, no
request running or queued.
"""

import collections
import dataclasses
import json

import httpx2 as httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance,
                                               status_code_conformance)

from jblock.runtime.mock_engine import MockEngine
from jblock.serving.frontend import Frontend
from jblock.serving.http import HttpServer
from jblock.serving.openai_schema import ChatCompletionRequest
from tests.serving.conftest import EOS
from tests.serving.serving_helpers import kv_slots_used, wait_until

EXAMPLES = 30  # drawn bodies per route and mode, after the coverage cases
MODES = list(schemathesis.GenerationMode)  # positive, negative
ROUTES = {"/v1/completions": "CompletionChunk", "/v1/chat/completions": "ChatCompletionChunk"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]
SERVED = ["mock-a", "mock-ids"]  # with a tokenizer, and token ids only
SHORT = 4  # max_tokens given to a chat request without one (it would run to the context)
# A failure shows the body whole: its *_tokens fields are no secrets to hide.
CONFIG = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})


class _Unconstrained(MockEngine):
  """The mock's head makes tokens by arithmetic and cannot apply a grammar's mask, so a
  constrained request would break its grammar (a 500): the frontend still checks and compiles
  every response_format, the engine is handed no constraint."""

  def submit(self, model, prompt_tokens, constraint=None, **kwargs):
    return super().submit(model, prompt_tokens, **kwargs)


@pytest.fixture
def served(catalog, tokenizer):
  """An open server over MockEngine models that, like real ones, have an EOS id."""
  eos = (tokenizer.token_to_id(EOS),)
  models = {name: dataclasses.replace(info, eos_token_ids=eos) if info.tokenizer_dir else info
            for name, info in catalog.items()}
  engine = _Unconstrained(models, step_delay_s=0.0)
  frontend = Frontend(engine)
  http = HttpServer(frontend, 0)
  http.start()
  yield engine, frontend, f"http://127.0.0.1:{http.port}"
  http.stop()
  frontend.close()
  engine.close()


def _validator(document: dict, name: str) -> jsonschema.Draft202012Validator:
  """Validates against one of the document's components ($refs resolve within it)."""
  return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                          "components": document["components"]})


def _steer(case, model, stream: bool):
  """Swaps schema-valid values the server refuses on other grounds for schema-valid ones it
  serves, so that a body is refused for what its generator broke, not for these: most model
  names are served by nobody (`model` None keeps the generated one), an empty prompt has no
  token, an assistant's null content needs tool calls, a chat without max_tokens runs to the
  context (slow). `stream` streams a body that does not say (few generated ones would).
  Values that break the schema, a negative case's, are never touched."""
  body = case.body
  if not isinstance(body, dict):
    return case
  if model and isinstance(body.get("model"), str) and body["model"]:
    body["model"] = model
  if stream and body.get("stream") is None:
    body["stream"] = True
  if body.get("prompt") == "":
    body["prompt"] = "hello"
  messages = body.get("messages")
  if isinstance(messages, list):
    for message in messages:
      if isinstance(message, dict) and message.get("role") == "assistant" and \
          message.get("content") is None and not message.get("tool_calls"):
        message["content"] = "hello"
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
      body["max_tokens"] = SHORT
  return case


def _check_events(response, cap: int, chunk: jsonschema.Draft202012Validator,
                  error: jsonschema.Draft202012Validator) -> None:
  """A streamed answer: JSON chunks then data: [DONE], or an error event last. Schemathesis
  reads `cap` events at most, then hangs up (the server cancels the rest)."""
  events = [part.removeprefix("data: ") for part in response.text.split("\n\n") if part]
  done = events[-1] == "[DONE]"
  chunks = events[:-1] if done else events
  if not done and len(events) < cap:  # it ended early: with an error
    error.validate(json.loads(chunks.pop()))
  for event in chunks:
    chunk.validate(json.loads(event))


def test_generation_routes_keep_to_their_openapi_schema(served):
  engine, frontend, base = served
  schema = schemathesis.openapi.from_url(f"{base}/openapi.json", config=CONFIG)
  error = _validator(schema.raw_schema, "ErrorResponse")
  statuses, streamed = collections.Counter(), collections.Counter()

  def send(case, path: str, chunk) -> None:
    cap = schema.config.max_stream_events_for(operation=case.operation)
    response = case.call(base_url=base, timeout=30)
    statuses[(path, case.meta.generation.mode.value, response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
      _check_events(response, cap, chunk, error)
      streamed[path] += 1
    elif response.status_code == 400:
      assert response.json()["error"]["type"] == "invalid_request_error"

  for path, chunk_name in ROUTES.items():
    operation = schema[path]["POST"]
    chunk = _validator(schema.raw_schema, chunk_name)
    coverage = schema.iter_coverage_cases(
        operation, generation_modes=MODES,
        generation_config=schema.config.generation_for(operation=operation, phase="coverage"))
    for i, case in enumerate(coverage):
      send(_steer(case, SERVED[0], stream=i % 2 == 1), path, chunk)
    for mode in MODES:
      cases = st.builds(_steer, operation.as_strategy(generation_mode=mode),
                        st.sampled_from(SERVED + [None]), st.booleans())

      @given(case=cases)
      @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                phases=[Phase.generate],  # no shrinking: a failing body is reported whole
                suppress_health_check=list(HealthCheck))
      def fuzz(case):
        send(case, path, chunk)

      fuzz()
  print(f"\n{sum(statuses.values())} requests:", dict(sorted(statuses.items())),
        "streamed:", dict(streamed))
  # Most valid bodies reached the engine and were answered, streamed ones read event by event.
  for path in ROUTES:
    assert statuses[(path, "positive", 200)] >= 100 and streamed[path] >= 20, statuses
  assert httpx.get(f"{base}/health", timeout=10).status_code == 200
  wait_until(lambda: not any(kv_slots_used(engine.stats()).values()), timeout=10)
  requests = engine.stats()["requests"]
  assert requests["active"] == 0 and requests["waiting"] == 0, requests
  assert frontend.drain.in_flight == 0


def test_a_typed_body_that_does_not_validate_is_a_400_naming_the_field(catalog):
  """No route takes a typed body today; one that did would answer in OpenAI's shape, not 422."""
  engine = MockEngine(catalog)
  frontend = Frontend(engine)
  http = HttpServer(frontend, 0)

  @http.app.post("/typed")
  async def typed(body: ChatCompletionRequest):
    return {}

  http.start()
  try:
    for wrong, param in (({"top_p": 2}, "top_p"),
                         ({"stream_options": {"include_usage": "x"}},
                          "stream_options.include_usage")):
      response = httpx.post(f"http://127.0.0.1:{http.port}/typed", timeout=10, json={
          "model": "mock-a", "messages": [{"role": "user", "content": "x"}], **wrong})
      assert response.status_code == 400, response.text
      error = response.json()["error"]
      assert error == {"message": error["message"], "type": "invalid_request_error",
                       "param": param, "code": "invalid_argument"}
      assert error["message"].startswith(f"{param}: ")
  finally:
    http.stop()
    frontend.close()
    engine.close()


def test_a_response_format_for_a_model_without_eos_ids_is_a_400(catalog):
  engine = MockEngine(catalog)
  frontend = Frontend(engine)
  http = HttpServer(frontend, 0)
  http.start()
  try:
    url = f"http://127.0.0.1:{http.port}/v1/completions"
    text = httpx.post(url, timeout=10, json={"model": "mock-a", "prompt": "hello",
                                             "response_format": {"type": "text"}})
    assert text.status_code == 200, text.text  # no grammar for plain text
    response = httpx.post(url, timeout=10, json={
        "model": "mock-a", "prompt": "hello", "response_format": {"type": "json_object"}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"
    assert "no EOS token id" in response.json()["error"]["message"]
  finally:
    http.stop()
    frontend.close()
    engine.close()


def test_falsy_tool_calls_are_refused(served):
  _, _, base = served
  for calls in (0, False, "", {}):
    response = httpx.post(f"{base}/v1/chat/completions", timeout=10, json={
        "model": "mock-a", "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "x", "tool_calls": calls}]})
    assert response.status_code == 400, (calls, response.text)
