"""Bounds on everything a client sizes or ranges, the same on gRPC and HTTP: the request id
(echoed twice, not per token), model names, HTTP's `user`, and the sampling ranges, which
engine_api.validate_request alone checks for both protocols. MockEngine on 127.0.0.1."""

import json
import math
import types

import grpc
import httpx2 as httpx
import pytest

from jblock.client import Client
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.runtime.mock_engine import MockEngine
from jblock.serving import coordinator
from jblock.serving.frontend import Frontend
from jblock.serving.http import HttpServer


@pytest.fixture
def servers(catalog):
  """gRPC (a raw stub and the client) and HTTP over one frontend."""
  engine = MockEngine(catalog, step_delay_s=0.001)
  frontend = Frontend(engine)
  grpc_server, port = coordinator.build_server(engine, 0, max_workers=16, frontend=frontend)
  grpc_server.start()
  http = HttpServer(frontend, 0)
  http.start()
  channel = grpc.insecure_channel(f"127.0.0.1:{port}")
  client = Client(f"127.0.0.1:{port}", retry_s=0)
  yield types.SimpleNamespace(stub=pb_grpc.InferenceStub(channel), client=client,
                              url=f"http://127.0.0.1:{http.port}/v1")
  client.close()
  channel.close()
  http.stop()
  grpc_server.stop(0).wait(5)
  frontend.close()
  engine.close()


def _http(servers, body: dict) -> httpx.Response:
  # json.dumps writes inf/nan as Infinity/NaN, which a JSON parser may take (Python's does).
  return httpx.post(f"{servers.url}/completions", content=json.dumps(body), timeout=30,
                    headers={"Content-Type": "application/json"})


def _assert_http_names(response: httpx.Response, field: str) -> None:
  assert response.status_code == 400, response.text
  error = response.json()["error"]
  assert error["param"] == field and error["message"].startswith(f"{field}: "), error


def _grpc_error(call) -> grpc.RpcError:
  with pytest.raises(grpc.RpcError) as e:
    list(call())
  return e.value


def test_a_long_request_id_is_refused_and_a_bounded_one_is_sent_twice(servers):
  huge = pb.GenerateRequest(model="mock-a", text="hello world", max_tokens=40,
                            request_id="x" * 500_000)
  error = _grpc_error(lambda: servers.stub.Generate(huge, timeout=10))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert error.details().startswith("request_id: is 500000 bytes; at most 256")

  request = pb.GenerateRequest(model="mock-a", text="hello world", max_tokens=40,
                               request_id="r" * 256)
  responses = list(servers.stub.Generate(request, timeout=10))
  assert len(responses) > 20
  # The id on the first message (the client learns it at once) and the last, nowhere else.
  assert [r.request_id for r in responses] == ["r" * 256] + [""] * (len(responses) - 2) + \
      ["r" * 256]
  sent = sum(r.ByteSize() for r in responses)
  generated = sum(pb.GenerateResponse(token_ids=r.token_ids, text=r.text).ByteSize()
                  for r in responses)
  assert generated > 0 and sent - generated <= 2 * request.ByteSize(), (sent, generated)
  # Without the fix: 256 bytes per message, (len(responses) - 2) * 259 more.
  print(f"request {request.ByteSize()} B, responses {sent} B ({len(responses)} messages), "
        f"generated {generated} B, (responses - generated) / request = "
        f"{(sent - generated) / request.ByteSize():.2f}")
  # The Python client still gives every chunk the id.
  chunks = list(servers.client.generate("mock-a", "hello world", max_tokens=5,
                                        request_id="r" * 256, timeout=10))
  assert {c.request_id for c in chunks} == {"r" * 256}


BAD_SAMPLING = [
    ("temperature", 1e300), ("temperature", math.inf), ("temperature", -math.inf),
    ("temperature", math.nan), ("temperature", -1), ("temperature", 101), ("temperature", 10**400),
    ("top_p", 0), ("top_p", 0.0), ("top_p", -1e-50), ("top_p", 1.5), ("top_p", math.nan),
    ("top_k", -1), ("top_k", 2**31), ("seed", -1), ("seed", 2**64), ("max_tokens", 0),
]


def test_out_of_range_sampling_is_refused_naming_the_field_on_both_protocols(servers, recwarn):
  for field, value in BAD_SAMPLING:
    _assert_http_names(_http(servers, {"model": "mock-a", "prompt": "hi", field: value}), field)
    try:
      request = pb.GenerateRequest(model="mock-a", text="hi", **{field: value})
    except (ValueError, TypeError, OverflowError):
      continue  # not on the wire: seed -1 (uint64), top_k 2**31 (int32), 10**400 (double)
    error = _grpc_error(lambda: servers.stub.Generate(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, value)
    assert error.details().startswith(f"{field}: "), (field, value, error.details())
  assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
  assert servers.client.generate_text("mock-a", "hi", max_tokens=3, timeout=10) is not None


def test_the_range_edges_are_served_on_both_protocols(servers, recwarn):
  edges = {"temperature": 100, "top_p": 1e-50, "top_k": 2**31 - 1, "seed": 2**64 - 1}
  response = _http(servers, {"model": "mock-a", "prompt": "hi", "max_tokens": 3, **edges})
  assert response.status_code == 200, response.text
  assert response.json()["usage"]["completion_tokens"] == 3
  chunks = list(servers.client.generate("mock-a", "hi", max_tokens=3, timeout=10, **edges))
  assert chunks[-1].usage.completion_tokens == 3
  # The seed bound is one: 2**64 - 1 above, and past 2**63 on HTTP as on gRPC (uint64).
  assert _http(servers, {"model": "mock-a", "prompt": "hi", "max_tokens": 1,
                         "seed": 2**63 + 5}).status_code == 200
  assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_model_names_and_user_strings_are_bounded(servers):
  long_name = "m" * 257
  _assert_http_names(_http(servers, {"model": long_name, "prompt": "hi"}), "model")
  error = _grpc_error(lambda: servers.client.generate(long_name, "hi", timeout=10))
  assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert error.details() == "model: is longer than 256 bytes"
  response = httpx.get(f"{servers.url}/models/{long_name}", timeout=30)
  assert response.status_code == 400 and response.json()["error"]["param"] == "model"
  # A name of the bound's length is looked up as usual.
  assert _http(servers, {"model": "m" * 256, "prompt": "hi"}).status_code == 404
  # OpenAI's `user` (accepted, not used): a string of at most 256 characters.
  _assert_http_names(_http(servers, {"model": "mock-a", "prompt": "hi", "user": "u" * 257}),
                     "user")
  _assert_http_names(_http(servers, {"model": "mock-a", "prompt": "hi", "user": 7}), "user")
  assert _http(servers, {"model": "mock-a", "prompt": "hi", "max_tokens": 1,
                         "user": "u" * 256}).status_code == 200
