"""The gRPC front door under hostile input: keys are checked from metadata before a body is
parsed (garbage without a key: UNAUTHENTICATED; with one: INVALID_ARGUMENT, never INTERNAL),
internal services the same with the cluster token, a bounded number of log lines per flood,
LoadModel errors without filesystem paths, and capacity bounded by the engine's admission
queue, not by threads (150 > 64 streams with launch.serve's default flags, as a process)."""

import concurrent.futures
import json
import logging
import subprocess
import sys

import grpc
import pytest

from jblock.client import Client
from jblock.cluster import security
from jblock.cluster.membership import Membership
from jblock.log_limits import RateLimitedLog, limited
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.runtime.mock_engine import MockEngine, mock_models
from jblock.serving import coordinator
from jblock.serving.frontend import Frontend
from jblock.serving.tenants import Tenants, key_sha256, parse_tenants
from jblock.zoo.store import Zoo
from tests.serving.test_processes import REPO

# A field tag with wire type 7: no protobuf message parses it.
GARBAGE = b"\xff\xff\xff\xff\x0fnot a protobuf"
ADMIN_KEY, KEY = "admin-secret", "tenant-key"
INFERENCE = ["/jblock.v1.Inference/Generate", "/jblock.v1.Inference/ListModels"]
ADMIN = ["/jblock.v1.Admin/LoadModel", "/jblock.v1.Admin/UnloadModel", "/jblock.v1.Admin/Stats"]
TOKEN = b"0123456789abcdef-cluster-token"


def _tenants() -> Tenants:
  tenant = {"name": "acme", "api_key_sha256": key_sha256(KEY), "models": ["*"]}
  return Tenants(*parse_tenants({"admin_key_sha256": key_sha256(ADMIN_KEY), "tenants": [tenant]}))


@pytest.fixture
def start():
  """start(engine, tenants=None, **build_server kwargs) -> port; all stopped afterwards."""
  started = []

  def run(engine, tenants=None, **kwargs):
    frontend = Frontend(engine, tenants)
    server, port = coordinator.build_server(engine, 0, frontend=frontend, **kwargs)
    server.start()
    started.append((server, frontend, engine))
    return port

  yield run
  for server, frontend, engine in started:
    server.stop(0).wait(5)
    frontend.close()
    engine.close()


def _raw(channel, method: str, body: bytes = GARBAGE, key: str | None = None, metadata=()):
  """(code, details) of `body` sent as is (no serializers) to `method`."""
  metadata = list(metadata) + ([("authorization", f"Bearer {key}")] if key else [])
  streaming = method.endswith("/Generate")
  call = (channel.unary_stream if streaming else channel.unary_unary)(method)
  try:
    response = call(body, metadata=metadata, timeout=10)
    if streaming:
      list(response)
  except grpc.RpcError as e:
    return e.code(), e.details()
  return grpc.StatusCode.OK, ""


def _engine(**kwargs) -> MockEngine:
  return MockEngine(mock_models(["m"], vocab_size=64, max_seq_len=64), **kwargs)


def test_garbage_gets_unauthenticated_without_a_key_and_invalid_argument_with_one(start, caplog):
  port = start(_engine(), _tenants())
  with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    for method in INFERENCE + ADMIN:
      for key in (None, "wrong"):
        code, details = _raw(channel, method, key=key)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (method, key, details)
      for key in (KEY, ADMIN_KEY):  # parsed before the Admin check: the body is the problem
        code, details = _raw(channel, method, key=key)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, key, details)
        assert details.startswith("request: ") and "jblock.v1." in details
    # Probes need no key; their garbage is still a bad request.
    assert _raw(channel, "/jblock.v1.Inference/Health")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _raw(channel, "/grpc.health.v1.Health/Check")[0] == grpc.StatusCode.INVALID_ARGUMENT

    # A flood: 100 garbage calls, half without a key, add a bounded number of log lines.
    limited.reset()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
      for i in range(100):
        _raw(channel, (INFERENCE + ADMIN)[i % 5], key=KEY if i % 2 else None)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert len(caplog.records) <= 6 * limited.first, text  # <= first per kind (6 kinds)
    assert "Exception deserializing" not in text and "Exception calling application" not in text
    assert not any(r.exc_info for r in caplog.records)
  with Client(f"127.0.0.1:{port}", api_key=KEY) as client:  # still serving
    assert client.generate_tokens("m", prompt_tokens=[1, 2], max_tokens=3, timeout=10)


def test_garbage_on_an_open_server_is_invalid_argument(start):
  port = start(_engine())
  with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    for method in INFERENCE + ADMIN:
      code, details = _raw(channel, method)
      assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, details)
      assert f"{method.rsplit('/', 1)[1]}Request ({len(GARBAGE)} bytes)" in details


def test_internal_garbage_needs_the_cluster_token():
  membership = Membership()
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(4),
                       interceptors=security.server_interceptors(
                           security.ClusterCredentials(token=TOKEN)))
  pb_grpc.add_RegistryServicer_to_server(membership, server)
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  try:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
      for method in ("/jblock.v1.Registry/Register", "/jblock.v1.Registry/Heartbeat"):
        assert _raw(channel, method)[0] == grpc.StatusCode.UNAUTHENTICATED
        code, details = _raw(channel, method, metadata=[(security.TOKEN_METADATA, TOKEN.decode())])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request: ")
  finally:
    server.stop(0)
    membership.stop()


class _ZooBacked(MockEngine):
  """Loads models from a real zoo's manifests: its errors carry the zoo's absolute path."""

  def load_model(self, name):
    self.zoo.manifest(name)


def test_load_model_errors_name_no_absolute_path(start, tmp_path):
  engine = _ZooBacked(mock_models(["m"]))
  engine.zoo = Zoo(str(tmp_path / "zoo"))
  (tmp_path / "zoo" / "models").mkdir(parents=True)
  (tmp_path / "zoo" / "models" / "broken.json").write_text("{not json")
  port = start(engine)
  with Client(f"127.0.0.1:{port}") as client:
    for name, code in (("nope", grpc.StatusCode.NOT_FOUND), ("broken", grpc.StatusCode.DATA_LOSS)):
      with pytest.raises(grpc.RpcError) as e:
        client.load_model(name, timeout=10)
      assert e.value.code() == code and repr(name) in e.value.details()
      assert str(tmp_path) not in e.value.details() and "/tmp" not in e.value.details()
  assert "(models/broken.json)" in e.value.details()
  assert coordinator.redact_paths("cannot read /etc/jblock/t.json: denied") == \
      "cannot read t.json: denied"


def test_a_stream_past_the_admission_limit_gets_the_engines_resource_exhausted(start):
  engine = _engine(max_queue=4, kv_slots=2, step_delay_s=0.05)
  port = start(engine)  # default capacity: from the engine's admission limit

  def one(i):
    with Client(f"127.0.0.1:{port}") as client:
      try:
        return client.generate_tokens("m", prompt_tokens=[1 + i % 5], max_tokens=8, timeout=30)
      except grpc.RpcError as e:
        return e.code(), e.details()

  with concurrent.futures.ThreadPoolExecutor(24) as pool:
    outcomes = list(pool.map(one, range(24)))
  refused = [o for o in outcomes if isinstance(o, tuple)]
  assert refused and len(refused) < 24
  for code, details in refused:
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "admission queue is full" in details


def test_max_workers_refuses_the_next_call_naming_its_limit(start):
  port = start(_engine(step_delay_s=0.05), max_workers=3)
  with Client(f"127.0.0.1:{port}") as client:
    held = [client.generate("m", prompt_tokens=[1], max_tokens=50, timeout=30) for _ in range(3)]
    for stream in held:
      next(iter(stream))  # running: each holds a call
    with pytest.raises(grpc.RpcError) as e:
      client.list_models()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 calls in progress, its limit (--max_workers)" in e.value.details()
    for stream in held:
      stream.cancel()
  with Client(f"127.0.0.1:{port}") as client:
    assert [m.name for m in client.list_models()] == ["m"]


def test_150_concurrent_streams_with_launch_serves_default_flags(tmp_path):
  """More than the old 64-thread limit, held at once, each with a lone request's tokens."""
  out = tmp_path / "capacity.json"
  run = subprocess.run([sys.executable, "-m", "tools.stream_capacity", "--streams=150",
                        "--engine=mock", "--server_flags=--mock_step_delay_s=0.02",
                        "--timeout_s=60", f"--out={out}"], cwd=REPO, capture_output=True,
                       text=True, timeout=180)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["errors"] == {}
  assert result["completed"] == result["correct_tokens"] == 150
  assert result["peak_in_flight"] > 64


def test_rate_limited_log_says_how_many_it_held_back(caplog):
  now = [0.0]
  log = RateLimitedLog(logging.getLogger("test.limits"), first=2, interval_s=10.0,
                       clock=lambda: now[0])
  with caplog.at_level(logging.WARNING, logger="test.limits"):
    logged = [log.warning("bad body", "bad body %d", i) for i in range(50)]
    assert logged[:2] == [True, True] and not any(logged[2:])
    log.warning("other", "another kind")  # kinds are limited separately
    now[0] = 11.0
    log.warning("bad body", "bad body again")
  assert [r.getMessage() for r in caplog.records] == [
      "bad body 0", "bad body 1", "another kind",
      "jblock: suppressed 48 similar messages (bad body) in the last 10s", "bad body again"]
