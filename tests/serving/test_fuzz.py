"""Fuzzed gRPC calls and HTTP bodies, with and without API keys: every answer is a status naming
what is wrong, never INTERNAL, UNKNOWN or a 5xx; the server keeps serving, no KV slot stays
leased, and the log grows by a bounded number of lines however many bad calls come."""

import json
import logging
import random
import string

import grpc
import httpx2 as httpx
import pytest

from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.runtime.mock_engine import MockEngine
from jblock.serving.coordinator import build_server
from jblock.serving.frontend import Frontend
from jblock.serving.http import HttpServer
from jblock.serving.tenants import Tenant, Tenants, key_sha256
from tests.serving.serving_helpers import kv_slots_used, wait_until

ADMIN, TENANT = "admin-key-0123456789", "tenant-key-0123456789"
CASES = 300
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
         grpc.StatusCode.UNIMPLEMENTED}
METHODS = ("/jblock.v1.Inference/Generate", "/jblock.v1.Inference/ListModels",
           "/jblock.v1.Inference/Health", "/jblock.v1.Admin/LoadModel", "/jblock.v1.Admin/UnloadModel",
           "/jblock.v1.Admin/Stats")


def _text(rng: random.Random, longest: int) -> str:
  alphabet = string.printable + "é漢\u0000\u202e\U0001f600"
  return "".join(rng.choice(alphabet) for _ in range(rng.randrange(longest + 1)))


def _number(rng: random.Random) -> float:
  return rng.choice([0.0, -1.0, 0.5, 1.0, 2.0, 100.0, 101.0, 1e-50, 1e300, -1e300,
                     float("inf"), float("-inf"), float("nan"), rng.uniform(-5, 5)])


def _int(rng: random.Random, bits: int = 31) -> int:
  return rng.choice([0, 1, -1, 2, 7, 33, 127, 128, 2**bits - 1, -(2**bits),
                     rng.randrange(-1000, 1000)])


def _request(rng: random.Random) -> pb.GenerateRequest:
  r = pb.GenerateRequest(model=rng.choice(["mock-a", "mock-ids", "", "nope", "../etc",
                                           "m" * 300, _text(rng, 20)]))
  prompt = rng.randrange(4)
  if prompt == 0:
    r.text = _text(rng, 60)
  elif prompt == 1:
    r.tokens.SetInParent()
    r.tokens.ids.extend(_int(rng) for _ in range(rng.randrange(12)))
  elif prompt == 2:
    r.chat.SetInParent()
    for _ in range(rng.randrange(4)):
      r.chat.messages.add(role=rng.choice(["user", "system", "assistant", "", "x" * 99]),
                          content=_text(rng, 30))
  for field, make in (("max_tokens", lambda: _int(rng) % 50 if rng.random() < 0.7 else _int(rng)),
                      ("temperature", lambda: _number(rng)), ("top_p", lambda: _number(rng)),
                      ("top_k", lambda: _int(rng)),
                      ("seed", lambda: rng.choice([0, 1, 2**64 - 1, rng.randrange(2**64)])),
                      ("request_id", lambda: _text(rng, rng.choice([8, 300])))):
    if rng.random() < 0.5:
      setattr(r, field, make())
  r.stop_token_ids.extend(_int(rng) for _ in range(rng.choice([0, 0, 2, 5])))
  r.stop.extend(_text(rng, rng.choice([4, 300])) for _ in range(rng.choice([0, 0, 1, 6])))
  return r


@pytest.fixture
def fuzzed_server(catalog):
  tenants = Tenants(key_sha256(ADMIN), [Tenant("acme", key_sha256(TENANT), ("mock-a",))])
  engine = MockEngine(catalog, step_delay_s=0.0)
  frontend = Frontend(engine, tenants)
  server, port = build_server(engine, 0, frontend=frontend)
  server.start()
  http = HttpServer(frontend, 0)
  http.start()
  channel = grpc.insecure_channel(f"127.0.0.1:{port}")
  yield channel, engine, f"http://127.0.0.1:{http.port}"
  channel.close()
  http.stop()
  server.stop(0).wait(5)
  frontend.close()
  engine.close()


def _code(call) -> grpc.StatusCode:
  try:
    result = call()
    if hasattr(result, "__next__"):  # a stream: read it to its end
      for _ in result:
        pass
    return grpc.StatusCode.OK
  except grpc.RpcError as e:
    return e.code()


def test_fuzzed_calls_get_named_statuses_and_leave_the_server_idle(fuzzed_server, caplog):
  channel, engine, _ = fuzzed_server
  rng = random.Random(0)
  inference, admin = pb_grpc.InferenceStub(channel), pb_grpc.AdminStub(channel)
  keys = [None, "wrong-key", TENANT, ADMIN]
  codes: dict[grpc.StatusCode, int] = {}
  caplog.set_level(logging.INFO)
  before = len(caplog.records)
  for i in range(CASES):
    key = keys[i % len(keys)]
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    kind = rng.randrange(10)
    if kind < 6:
      call = lambda: inference.Generate(_request(rng), metadata=metadata, timeout=10)
    elif kind < 8:  # raw bytes that may not parse at all
      method = rng.choice(METHODS)
      raw = channel.unary_unary(method) if "Generate" not in method else channel.unary_stream(method)
      blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
      call = lambda: raw(blob, metadata=metadata, timeout=10)
    else:
      name = rng.choice(["mock-a", "nope", "", "../../etc/passwd", "n" * 300])
      call = rng.choice([
          lambda: admin.LoadModel(pb.LoadModelRequest(name=name), metadata=metadata, timeout=10),
          lambda: admin.Stats(pb.StatsRequest(), metadata=metadata, timeout=10),
          lambda: inference.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)])
    code = _code(call)
    codes[code] = codes.get(code, 0) + 1
  assert not NEVER & set(codes), codes
  # Each kind of refusal came up, and some calls were served.
  assert {grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED,
          grpc.StatusCode.INVALID_ARGUMENT} <= set(codes), codes
  admin_md = (("authorization", f"Bearer {ADMIN}"),)
  assert inference.Health(pb.HealthRequest(), metadata=admin_md, timeout=10).status == pb.SERVING
  wait_until(lambda: set(kv_slots_used(engine.stats()).values()) <= {0}, timeout=10)
  lines = len(caplog.records) - before
  assert lines <= 60, f"{lines} log lines for {CASES} fuzzed calls"
  assert not any(r.exc_info for r in caplog.records[before:])


def _json_value(rng: random.Random, depth: int = 0):
  kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 2 else [])
  kind = rng.choice(kinds)
  if kind == "int":
    return _int(rng, rng.choice([31, 63, 70]))
  if kind == "float":
    return rng.choice([0.5, -1.0, 1e300, 101.0, 1e-50])
  if kind == "str":
    return _text(rng, rng.choice([5, 40]))
  if kind == "bool":
    return rng.random() < 0.5
  if kind == "list":
    return [_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
  if kind == "dict":
    return {_text(rng, 6): _json_value(rng, depth + 1) for _ in range(rng.randrange(3))}
  return None


FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "stream", "n", "user", "logprobs", "echo", "stream_options", "suffix"]


def _body(rng: random.Random, chat: bool) -> bytes:
  kind = rng.randrange(10)
  if kind == 0:  # not JSON at all
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
  body = {"model": rng.choice(["mock-a", "mock-ids", "nope", "", 7, None]),
          ("messages" if chat else "prompt"): (
              [{"role": rng.choice(["user", "system", "x", 3]), "content": _json_value(rng)}
               for _ in range(rng.randrange(3))] if chat else
              rng.choice([_text(rng, 30), [1, 2, 3], [], _json_value(rng)]))}
  for field in rng.sample(FIELDS, rng.randrange(5)):
    body[field] = _json_value(rng)
  if "max_tokens" not in body or rng.random() < 0.5:
    body["max_tokens"] = rng.randrange(1, 6)
  return json.dumps(body).encode()


def test_fuzzed_http_bodies_get_4xx_never_5xx_and_leave_the_server_idle(fuzzed_server, caplog):
  channel, engine, base = fuzzed_server
  rng = random.Random(1)
  keys = [None, "wrong-key", TENANT, ADMIN]
  statuses: dict[int, int] = {}
  caplog.set_level(logging.INFO)
  before = len(caplog.records)
  with httpx.Client(base_url=base, timeout=30) as http:
    for i in range(CASES):
      key = keys[i % len(keys)]
      headers = {"Authorization": f"Bearer {key}"} if key else {}
      path = rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics",
                         "/health", "/v1/nope"])
      if path in ("/v1/models", "/metrics", "/health"):
        response = http.get(path, headers=headers)
      else:
        response = http.post(path, content=_body(rng, "chat" in path),
                             headers={"Content-Type": "application/json", **headers})
      statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
  assert all(code < 500 for code in statuses), statuses
  assert {200, 400, 401} <= set(statuses), statuses
  with httpx.Client(base_url=base, timeout=30) as http:
    assert http.get("/health").status_code == 200
  wait_until(lambda: set(kv_slots_used(engine.stats()).values()) <= {0}, timeout=10)
  lines = [r for r in caplog.records[before:] if not r.name.startswith("httpx")]  # the server's
  assert len(lines) <= 60, f"{len(lines)} log lines for {CASES} fuzzed bodies"
  assert not any(r.exc_info for r in lines)
