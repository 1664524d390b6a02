"""OpenAI-compatible HTTP beside gRPC over one frontend, with the official `openai` client;
tenants, keys, quotas and hostile input. MockEngine, everything on 127.0.0.1."""

import json
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
import httpx2 as httpx
import openai
import pytest

from jblock.client import Client
from jblock.runtime.engine_api import SamplingParams
from jblock.runtime.mock_engine import MockEngine, mock_generate
from jblock.serving import coordinator, text
from jblock.serving.frontend import Frontend
from jblock.serving.http import HttpServer
from jblock.serving.metrics import ServingMetrics
from jblock.serving.tenants import Tenants, key_sha256, parse_tenants
from tests.serving.serving_helpers import kv_slots_used, wait_until

ADMIN_KEY, KEY_A, KEY_B = "admin-secret", "key-of-a", "key-of-b"
TENANTS = {
    "admin_key_sha256": key_sha256(ADMIN_KEY),
    "tenants": [
        {"name": "a", "api_key_sha256": key_sha256(KEY_A), "models": ["mock-a", "mock-ids"]},
        {"name": "b", "api_key_sha256": key_sha256(KEY_B), "models": ["mock-b"],
         "requests_per_minute": 3, "max_concurrent": 1},
    ],
}


class Stack:
  """gRPC and HTTP servers on one frontend; `stop()` ends both and the engine."""

  def __init__(self, engine, tenants=None, max_request_bytes=1 << 20):
    self.engine = engine
    self.metrics = ServingMetrics(engine)
    self.frontend = Frontend(engine, tenants, metrics=self.metrics,
                             max_request_bytes=max_request_bytes)
    self.grpc, self.grpc_port = coordinator.build_server(
        engine, 0, max_workers=16, metrics=self.metrics, frontend=self.frontend,
        max_message_bytes=max_request_bytes)
    self.grpc.start()
    self.http = HttpServer(self.frontend, 0)
    self.http.start()
    self.base_url = f"http://127.0.0.1:{self.http.port}/v1"
    self.target = f"127.0.0.1:{self.grpc_port}"
    self._clients = []

  def openai(self, key="none", **kwargs) -> openai.OpenAI:
    client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30,
                           **kwargs)
    self._clients.append(client)
    return client

  def grpc_client(self, key=None) -> Client:
    client = Client(self.target, api_key=key)
    self._clients.append(client)
    return client

  def stop(self):
    for client in self._clients:
      client.close()
    self.http.stop()
    self.grpc.stop(0).wait(5)
    self.frontend.close()
    self.engine.close()


@pytest.fixture
def stack():
  started = []

  def start(engine, tenants=None, **kwargs):
    s = Stack(engine, tenants, **kwargs)
    started.append(s)
    return s

  yield start
  for s in started:
    s.stop()


def _tenants():
  return Tenants(*parse_tenants(json.loads(json.dumps(TENANTS))))


def _post(url, body, key=None, **kwargs):
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  return httpx.post(url, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                    headers={"Content-Type": "application/json", **headers}, timeout=30,
                    **kwargs)


def test_openai_client_completions_chat_streaming_and_models(stack, catalog, tokenizer):
  s = stack(MockEngine(catalog, step_delay_s=0.001))
  oa, grpc_client = s.openai(), s.grpc_client()
  assert [m.id for m in oa.models.list().data] == ["mock-a", "mock-b", "mock-ids"]
  assert oa.models.retrieve("mock-a").id == "mock-a"

  prompt = "hello world"
  grpc_text = grpc_client.generate_text("mock-a", prompt, max_tokens=12)
  ids = text.encode(tokenizer, prompt)
  expected, _ = mock_generate(catalog["mock-a"], ids, SamplingParams(max_new_tokens=12))
  assert grpc_text == tokenizer.decode(ids + expected)[len(prompt):]

  done = oa.completions.create(model="mock-a", prompt=prompt, max_tokens=12)
  assert done.choices[0].text == grpc_text
  assert done.choices[0].finish_reason == "length"
  assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), 12)
  assert done.usage.total_tokens == len(ids) + 12

  stream = oa.completions.create(model="mock-a", prompt=prompt, max_tokens=12, stream=True,
                                 stream_options={"include_usage": True})
  chunks = list(stream)
  assert "".join(c.choices[0].text for c in chunks if c.choices) == grpc_text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert chunks[-1].usage.completion_tokens == 12

  # Token-id prompts for a model without a tokenizer: the tokens come back as usage only.
  ids_done = oa.completions.create(model="mock-ids", prompt=[5, 17, 42], max_tokens=7)
  assert ids_done.usage.completion_tokens == 7 and ids_done.choices[0].text == ""

  messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
  chat = oa.chat.completions.create(model="mock-b", messages=messages, max_tokens=10)
  grpc_chat = grpc_client.generate_text("mock-b", messages=messages, max_tokens=10)
  assert chat.choices[0].message.content == grpc_chat and chat.choices[0].message.role == "assistant"
  streamed = oa.chat.completions.create(model="mock-b", messages=messages, max_tokens=10,
                                        stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in streamed) == grpc_chat

  # Seeded sampling reaches the engine.
  seeded = oa.completions.create(model="mock-a", prompt=prompt, max_tokens=6, temperature=0.5,
                                 seed=3, top_p=0.9)
  sampled, _ = mock_generate(catalog["mock-a"], ids,
                             SamplingParams(max_new_tokens=6, temperature=0.5, seed=3))
  assert seeded.choices[0].text == tokenizer.decode(ids + sampled)[len(prompt):]


def test_stop_strings_cut_the_text_exactly_on_both_protocols(stack, catalog, tokenizer):
  s = stack(MockEngine(catalog, step_delay_s=0.001))
  oa, grpc_client = s.openai(), s.grpc_client()
  full = oa.completions.create(model="mock-a", prompt="hello", max_tokens=30).choices[0].text
  stop = full[len(full) // 2:len(full) // 2 + 2]
  expected = full[:full.index(stop)]
  got = oa.completions.create(model="mock-a", prompt="hello", max_tokens=30, stop=[stop, "\x00"])
  assert got.choices[0].text == expected and got.choices[0].finish_reason == "stop"
  assert got.usage.completion_tokens < 30
  streamed = oa.completions.create(model="mock-a", prompt="hello", max_tokens=30, stop=stop,
                                   stream=True)
  assert "".join(c.choices[0].text for c in streamed) == expected
  chunks = list(grpc_client.generate("mock-a", "hello", max_tokens=30, stop=[stop]))
  assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"
  # The stopped request freed its slots.
  wait_until(lambda: not any(kv_slots_used(s.engine.stats()).values()))


def test_chat_without_max_tokens_runs_to_the_context_limit(stack, catalog):
  """As vLLM's does; gRPC keeps the engine's default of 32."""
  s = stack(MockEngine(catalog))
  messages = [{"role": "user", "content": "hello world"}]
  chat = s.openai().chat.completions.create(model="mock-a", messages=messages)
  assert chat.choices[0].finish_reason == "length"
  assert chat.usage.prompt_tokens + chat.usage.completion_tokens == catalog["mock-a"].max_seq_len
  assert chat.usage.completion_tokens > 32
  assert len(s.grpc_client().generate_tokens("mock-a", messages=messages)) == 32


def test_tokenize_and_detokenize_as_generation_sees_the_prompt(stack, catalog, tokenizer):
  s = stack(MockEngine(catalog), _tenants())
  url = s.base_url.removesuffix("/v1")
  text = "café naïve: hello world"
  got = _post(f"{url}/tokenize", {"model": "mock-a", "prompt": text}, KEY_A).json()
  completion = s.openai(KEY_A).completions.create(model="mock-a", prompt=text, max_tokens=1)
  assert got == {"count": completion.usage.prompt_tokens, "max_model_len": 128,
                 "tokens": tokenizer.encode(text).ids}
  back = _post(f"{url}/detokenize", {"model": "mock-a", "tokens": got["tokens"]}, KEY_A)
  assert back.json() == {"prompt": text}
  messages = [{"role": "user", "content": "hello"}]
  chat = s.openai(KEY_A).chat.completions.create(model="mock-a", messages=messages, max_tokens=1)
  counted = _post(f"{url}/tokenize", {"model": "mock-a", "messages": messages}, KEY_A).json()
  assert counted["count"] == chat.usage.prompt_tokens
  # Keys and models as for generation; bad input named.
  assert _post(f"{url}/tokenize", {"model": "mock-a", "prompt": "x"}).status_code == 401
  assert _post(f"{url}/tokenize", {"model": "mock-b", "prompt": "x"}, KEY_A).status_code == 404
  for body, field in (({"model": "mock-a"}, "prompt"), ({"model": "mock-a", "prompt": 3}, "prompt"),
                      ({"model": "mock-ids", "prompt": "x"}, "prompt")):
    r = _post(f"{url}/tokenize", body, KEY_A)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.json()
  for tokens in ([1, 10**6], "12", [True], list(range(200))):
    r = _post(f"{url}/detokenize", {"model": "mock-a", "tokens": tokens}, KEY_A)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.json()


def test_chat_template_is_applied_as_transformers_does(tmp_path, tokenizer_dir, catalog):
  import shutil
  from transformers import AutoTokenizer
  from jblock.runtime.engine_api import ModelInfo
  chat_dir = tmp_path / "chat_tok"
  shutil.copytree(tokenizer_dir, chat_dir)
  template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}"
              "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
  (chat_dir / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": template, "bos_token": "<eos>", "eos_token": "<eos>",
       "tokenizer_class": "PreTrainedTokenizerFast"}))
  info = catalog["mock-a"]
  models = {"chat": ModelInfo("chat", "mock", info.vocab_size, info.max_seq_len, info.chain,
                              tokenizer_dir=str(chat_dir))}
  engine = MockEngine(models)
  frontend = Frontend(engine)
  messages = [{"role": "system", "content": " You are terse. "},
              {"role": "user", "content": "hello world, café"}]
  try:
    from jblock.serving.frontend import GenerationRequest
    generation = frontend.generate(frontend.authenticate(None),
                                   GenerationRequest(model="chat", messages=messages, max_tokens=2))
    list(generation)
    hf = AutoTokenizer.from_pretrained(str(chat_dir))
    assert generation.prompt_tokens == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                              tokenize=True, return_dict=False)
  finally:
    frontend.close()
    engine.close()


def test_client_disconnect_mid_stream_frees_the_kv(stack, catalog):
  engine = MockEngine(catalog, step_delay_s=0.03)
  s = stack(engine)
  with httpx.stream("POST", f"{s.base_url}/completions", timeout=30,
                    json={"model": "mock-a", "prompt": "hello", "max_tokens": 100,
                          "stream": True}) as response:
    lines = response.iter_lines()
    got = [next(lines) for _ in range(4)]
    assert all(line.startswith("data: ") or line == "" for line in got)
    assert any(kv_slots_used(engine.stats()).values())
  # The connection is closed: the request is cancelled and its KV slots freed at once.
  wait_until(lambda: not any(kv_slots_used(engine.stats()).values()), timeout=10)
  assert s.frontend.drain.in_flight == 0
  counts = engine.stats()["requests"]
  assert counts.get("cancelled", 0) + counts.get("finished", {}).get("cancelled", 0) >= 1 \
      or "cancelled" in json.dumps(counts)


def test_a_non_streaming_client_that_disconnects_frees_the_kv(stack, catalog):
  engine = MockEngine(catalog, step_delay_s=0.03)
  s = stack(engine)
  with pytest.raises(httpx.TimeoutException):  # the client gives up and closes
    httpx.post(f"{s.base_url}/completions", timeout=0.5,
               json={"model": "mock-a", "prompt": "hello", "max_tokens": 100})
  # Noticed at the next token: cancelled long before its 100 tokens x 30 ms.
  wait_until(lambda: s.frontend.drain.in_flight == 0, timeout=2)
  assert not any(kv_slots_used(engine.stats()).values())


class _TenantRecorder(MockEngine):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.tenants_seen = []

  def submit(self, model, prompt_tokens, **kwargs):
    self.tenants_seen.append(kwargs.get("tenant"))
    return super().submit(model, prompt_tokens, **kwargs)


def test_keys_models_and_admin_per_tenant(stack, catalog):
  s = stack(_TenantRecorder(catalog, step_delay_s=0.001), _tenants())
  # No key / a wrong key: 401 and UNAUTHENTICATED.
  with pytest.raises(openai.AuthenticationError):
    s.openai(key="wrong").models.list()
  with pytest.raises(openai.AuthenticationError):
    s.openai(key="wrong").completions.create(model="mock-a", prompt="hi", max_tokens=2)
  for key in (None, "wrong"):
    with pytest.raises(grpc.RpcError) as e:
      s.grpc_client(key).list_models()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
  no_key = httpx.get(f"{s.base_url}/models")
  assert no_key.status_code == 401 and "API key is required" in no_key.json()["error"]["message"]
  assert _post(f"{s.base_url}/completions", {"model": "mock-a", "prompt": "hi"}).status_code == 401

  a, b = s.openai(KEY_A), s.openai(KEY_B)
  assert [m.id for m in a.models.list().data] == ["mock-a", "mock-ids"]
  assert [m.id for m in b.models.list().data] == ["mock-b"]
  assert [m.name for m in s.grpc_client(KEY_A).list_models()] == ["mock-a", "mock-ids"]
  # Another tenant's model: the same 404 as a model that does not exist, naming nothing else.
  errors = []
  for model in ("mock-b", "no-such-model"):
    with pytest.raises(openai.NotFoundError) as e:
      a.completions.create(model=model, prompt="hi", max_tokens=2)
    errors.append(e.value.body["message"].replace(model, "M"))
    assert "mock-a" not in str(e.value.body) and "mock-ids" not in str(e.value.body)
    with pytest.raises(grpc.RpcError) as g:
      s.grpc_client(KEY_A).generate_text(model, "hi", max_tokens=2)
    assert g.value.code() == grpc.StatusCode.NOT_FOUND and "mock-a" not in g.value.details()
  assert errors[0] == errors[1]
  with pytest.raises(openai.NotFoundError):
    a.models.retrieve("mock-b")
  assert a.completions.create(model="mock-a", prompt="hi", max_tokens=2).usage.completion_tokens == 2
  assert s.engine.tenants_seen == ["a"]  # the engine schedules fairly by this label

  # Admin: PERMISSION_DENIED for a tenant, fine with the admin key.
  for call in ("stats", "unload_model"):
    with pytest.raises(grpc.RpcError) as e:
      getattr(s.grpc_client(KEY_A), call)(*(["mock-a"] if call == "unload_model" else []))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
  assert s.grpc_client(ADMIN_KEY).stats()["blocks"]
  assert s.grpc_client().health() == "SERVING"  # health needs no key
  assert [m.name for m in s.grpc_client(ADMIN_KEY).list_models()] == ["mock-a", "mock-b", "mock-ids"]

  # Per-tenant metrics.
  metrics = s.metrics.render().decode()
  assert 'jblock_tenant_requests_total{status="OK",tenant="a"}' in metrics or \
      'jblock_tenant_requests_total{tenant="a",status="OK"}' in metrics


def test_quotas_give_429_with_a_retry_hint_and_spare_other_tenants(stack, catalog):
  engine = MockEngine(catalog, step_delay_s=0.02)
  s = stack(engine, _tenants())
  a, b = s.openai(KEY_A), s.openai(KEY_B)
  # b: max_concurrent 1. A long request holds its one slot.
  long = httpx.stream("POST", f"{s.base_url}/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY_B}"},
                      json={"model": "mock-b", "prompt": "hello", "max_tokens": 100, "stream": True})
  response = long.__enter__()
  try:
    lines = response.iter_lines()  # kept: dropping the iterator closes the connection
    next(lines)
    with pytest.raises(openai.RateLimitError) as e:
      b.completions.create(model="mock-b", prompt="hi", max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    with pytest.raises(grpc.RpcError) as g:
      s.grpc_client(KEY_B).generate_text("mock-b", "hi", max_tokens=2)
    assert g.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after" in g.value.details()
    assert dict(g.value.trailing_metadata())["retry-after"] == "1"
    # Tenant a is not affected.
    assert a.completions.create(model="mock-a", prompt="hi", max_tokens=3).usage.completion_tokens == 3
  finally:
    long.__exit__(None, None, None)
  wait_until(lambda: s.frontend.drain.in_flight == 0, timeout=10)
  # b: 3 requests per minute; 3 were admitted... the first only. Two more fit, then 429.
  for _ in range(2):
    b.completions.create(model="mock-b", prompt="hi", max_tokens=1)
  with pytest.raises(openai.RateLimitError) as e:
    b.completions.create(model="mock-b", prompt="hi", max_tokens=1)
  assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
  assert "3 requests per minute" in e.value.body["message"]
  assert a.completions.create(model="mock-a", prompt="hi", max_tokens=1).usage.completion_tokens == 1


@pytest.mark.parametrize("body, phrase", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({"prompt": "hi"}, "model"),
    ({"model": "mock-a", "prompt": 7}, "prompt"),
    ({"model": "mock-a", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "mock-a", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "mock-a", "prompt": "hi", "max_tokens": 10_000}, "max_tokens"),
    ({"model": "mock-a", "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": "mock-a", "prompt": "hi", "temperature": True}, "temperature"),
    ({"model": "mock-a", "prompt": "hi", "n": 0}, "n"),
    ({"model": "mock-a", "prompt": "hi", "n": 2, "best_of": 1}, "best_of"),
    ({"model": "mock-a", "prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"model": "mock-a", "prompt": "hi", "logprobs": True}, "logprobs"),
    ({"model": "mock-a", "prompt": "hi", "stop": [1]}, "stop"),
    ({"model": "mock-a", "prompt": "hi", "stop": ["a"] * 5}, "stop"),
    ({"model": "mock-a", "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": "mock-a", "prompt": ["a"] * 65}, "at most 64"),
    ({"model": "mock-a", "prompt": ["a", []]}, "prompt[1]"),
    ({"model": "mock-a", "prompt": "hi", "suffix": "x"}, "suffix"),
    ({"model": "mock-a", "prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"model": "mock-a", "prompt": "hi", "logit_bias": {"3": 500}}, "logit_bias"),
    ({"model": "mock-a", "prompt": [1, 10**9]}, "outside the vocabulary"),
    ({"model": "mock-ids", "prompt": "text"}, "no tokenizer"),
    (b'{"model": "mock-a", "prompt": "bad \\ud800 surrogate"}', "not valid Unicode"),
    ({"model": "mock-a", "prompt": "hi", "top_k": 2**40}, "top_k"),
    ({"model": "mock-a", "prompt": "hi", "seed": -1}, "seed"),
    ({"model": 5, "prompt": "hi"}, "model"),
    ({"model": "mock-ids", "prompt": [1], "stop": "x"}, "stop token ids"),
    ({"model": "mock-a", "prompt": "hi", "echo": 1}, "echo"),
    ({"model": "mock-a", "prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "mock-a", "prompt": "hi", "min_p": -1}, "min_p"),
])
def test_bad_completion_requests_are_400_and_the_server_lives(stack, catalog, body, phrase):
  s = stack(MockEngine(catalog))
  response = _post(f"{s.base_url}/completions", body)
  assert response.status_code == 400, response.text
  error = response.json()["error"]
  assert phrase in error["message"] and error["type"] == "invalid_request_error"
  assert s.openai().completions.create(model="mock-a", prompt="hi", max_tokens=1)


def test_bad_chat_requests_huge_bodies_and_messages(stack, catalog):
  s = stack(MockEngine(catalog), max_request_bytes=64 * 1024)
  for body, phrase in (({"model": "mock-a", "messages": []}, "messages"),
                       ({"model": "mock-a", "messages": [{"role": "pirate", "content": "x"}]}, "role"),
                       ({"model": "mock-a", "messages": [{"role": "user", "content": 5}]}, "content"),
                       ({"model": "mock-a", "messages": "hi"}, "messages")):
    response = _post(f"{s.base_url}/chat/completions", body)
    assert response.status_code == 400 and phrase in response.json()["error"]["message"], body
  huge = json.dumps({"model": "mock-a", "prompt": "x" * 100_000})
  response = _post(f"{s.base_url}/completions", huge)
  assert response.status_code == 400 and "limit" in response.json()["error"]["message"]
  assert _post(f"{s.base_url}/nowhere", b"{}").status_code == 404
  with pytest.raises(grpc.RpcError) as e:
    s.grpc_client().generate_text("mock-a", "x" * 100_000, max_tokens=1)
  assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
  assert s.grpc_client().generate_text("mock-a", "hi", max_tokens=1) is not None
  assert s.openai().completions.create(model="mock-a", prompt="hi", max_tokens=1)


def test_a_multi_megabyte_prompt_is_refused_without_tokenising(stack, catalog, monkeypatch):
  calls = []
  real_encode = text.encode
  monkeypatch.setattr(text, "encode", lambda tok, t: calls.append(len(t)) or real_encode(tok, t))
  s = stack(MockEngine(catalog), max_request_bytes=8 << 20)
  heavy = "hello world " * 300_000  # 3.6 MB
  response = _post(f"{s.base_url}/completions", {"model": "mock-a", "prompt": heavy})
  assert response.status_code == 400
  assert "refused without tokenising" in response.json()["error"]["message"]
  with pytest.raises(grpc.RpcError) as e:
    s.grpc_client().generate_text("mock-a", heavy, max_tokens=1)
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "refused without" in e.value.details()
  chat = _post(f"{s.base_url}/chat/completions",
               {"model": "mock-a", "messages": [{"role": "user", "content": heavy}]})
  assert chat.status_code == 400 and "refused without" in chat.json()["error"]["message"]
  assert calls == []  # never tokenised
  s.openai().completions.create(model="mock-a", prompt="hello", max_tokens=1)
  assert calls == [5]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_heavy_prompts_of_one_tenant_do_not_stall_another(stack, catalog, protocol):
  """The issue's attack: 4 clients sending 3.5 MB prompts while another tenant streams."""
  from jblock.serving import heavy_input
  s = stack(MockEngine(catalog, step_delay_s=0.01), _tenants(), max_request_bytes=8 << 20)
  result = heavy_input.measure(s.target, victim_model="mock-a", attacker_model="mock-b",
                               http_url=s.base_url, protocol=protocol, victim_prompt="hello",
                               victim_key=KEY_A, attacker_key=ADMIN_KEY, warmup_s=0.5)
  print(f"\n{protocol}: victim's largest token gap alone {result['victim_gap_alone_s']}s, "
        f"under attack {result['victim_gap_attacked_s']}s; heavy: {result['heavy_requests']}")
  refused = "400" if protocol == "http" else "INVALID_ARGUMENT"
  assert set(result["heavy_requests"]) == {refused} and result["heavy_requests"][refused] >= 4
  assert result["victim_chunks"] > 10 and result["victim_error"] is None
  assert result["victim_gap_attacked_s"] < max(0.5, 10 * result["victim_gap_alone_s"])


def test_grpc_health_and_reflection(stack, catalog):
  s = stack(MockEngine(catalog, step_delay_s=0.02))
  channel = grpc.insecure_channel(s.target)
  try:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "jblock.v1.Inference"):
      status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
      assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {svc.name for svc in answers[0].list_services_response.service}
    assert {"jblock.v1.Inference", "jblock.v1.Admin", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    stream = s.grpc_client().generate("mock-ids", prompt_tokens=[1], max_tokens=30)
    next(stream)
    drained = []
    thread = threading.Thread(target=lambda: drained.append(s.grpc.drain(20)))
    thread.start()
    wait_until(lambda: s.frontend.drain.draining)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert httpx.get(f"http://127.0.0.1:{s.http.port}/health").status_code == 503
    with pytest.raises(openai.APIStatusError) as e:
      s.openai().completions.create(model="mock-a", prompt="hi", max_tokens=1)
    assert e.value.status_code == 503
    list(stream)
    thread.join(30)
    assert drained == [True]
  finally:
    channel.close()


def test_tenants_file_is_validated(tmp_path):
  from jblock.serving.tenants import TenantsFileError
  good = tmp_path / "t.json"
  good.write_text(json.dumps(TENANTS))
  assert [t.name for t in Tenants.from_file(str(good)).tenants] == ["a", "b"]
  for data, phrase in (({"tenants": []}, "admin_key_sha256"),
                       ({**TENANTS, "admin_key_sha256": "secret"}, "64 hex"),
                       ({**TENANTS, "tenants": [{**TENANTS["tenants"][0], "models": "x"}]}, "models"),
                       ({**TENANTS, "tenants": [TENANTS["tenants"][0]] * 2}, "twice"),
                       ({**TENANTS, "tenants": [{**TENANTS["tenants"][0], "max_concurrent": -1}]},
                        "max_concurrent")):
    with pytest.raises(TenantsFileError, match=phrase):
      parse_tenants(data)
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(TenantsFileError, match="cannot read"):
    Tenants.from_file(str(tmp_path / "bad.json"))
