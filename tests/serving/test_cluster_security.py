"""A cluster trusts only its members: callers without the cluster token get UNAUTHENTICATED from
every worker and registry RPC while a victim's greedy output stays undisturbed; malformed
internal requests get INVALID_ARGUMENT naming the field; with mutual TLS (certificates made
here with the openssl CLI) the tokens are the same; an expired step deadline fails cleanly.

Coordinator and two workers run in this process (real gRPC servers on 127.0.0.1)."""

import json
import os
import ssl
import urllib.request
import shutil
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

import jblock
from jblock.cluster import heartbeat, security
from jblock.cluster.links import ClusterLinks, StepDeadlines
from jblock.errors import InvalidRequestError
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.proto.tensor_codec import from_tensor, to_tensor, to_tensor_map
from jblock.runtime.engine import EngineConfig
from jblock.runtime.step import _INT_FIELDS as INT_FIELDS
from jblock.serving.coordinator import build_server
from jblock.serving.engines import distributed_engine
from jblock.serving.frontend import Frontend
from jblock.serving.http import HttpServer
from jblock.serving.metrics import ServingMetrics
from jblock.serving.worker import start_worker_server
from tests.serving.serving_helpers import free_port
from tests.serving.test_block_serving import PROMPTS, REPO, _wait_line
from tests.serving.test_block_serving import zoo_dir  # noqa: F401 (fixture)

CONFIG = EngineConfig(batch_size=4, kv_slots=8, max_seq_len=64, prefill_chunk=16,
                      length_buckets=(16,), warmup=False)
NEW = 24
VICTIMS = (1, 4)  # prompts of the victim requests
TOKEN = b"0123456789abcdef-cluster-token"


@pytest.fixture(scope="module")
def undisturbed(zoo_dir):
  model = jblock.from_zoo(zoo_dir, "base")
  return {i: model.generate([PROMPTS[i]], NEW)[0].tolist() for i in VICTIMS}


class Cluster:
  """A coordinator engine and two in-process workers sharing `credentials`."""

  def __init__(self, zoo: str, credentials: security.ClusterCredentials):
    from jblock.zoo.store import Zoo
    self.zoo = Zoo(zoo)
    self.credentials = credentials
    self.links = ClusterLinks(credentials)
    self.stop = threading.Event()
    self.workers, self.threads = [], []
    registry = free_port()
    self.registry = f"127.0.0.1:{registry}"
    for _ in range(2):
      server, port, host = start_worker_server(zoo, 0, "127.0.0.1", (1, 1), credentials)
      self.workers.append((server, f"127.0.0.1:{port}", host))
      t = threading.Thread(target=self._member, args=(f"127.0.0.1:{port}", host), daemon=True)
      t.start()
      self.threads.append(t)
    self.engine, self.registry_server = distributed_engine(
        zoo, ["base"], 2, registry, config=CONFIG, wait_s=60, progress=lambda *_: None,
        links=self.links)

  def _member(self, address: str, host) -> None:
    with security.channel(self.registry, self.credentials) as channel:
      joined = heartbeat.register(channel, "", address, timeout=60)
      heartbeat.run(channel, joined.worker_id, 0.2, host.load, self.stop, 30.0)

  def blocks(self) -> list[dict]:
    return self.engine.stats()["blocks"]

  def close(self) -> None:
    self.engine.close()
    self.stop.set()
    for t in self.threads:
      t.join(10)
    self.registry_server.stop(0)
    for server, _, _ in self.workers:
      server.stop(0)


@pytest.fixture(scope="module")
def token_cluster(zoo_dir):
  cluster = Cluster(zoo_dir, security.ClusterCredentials(token=TOKEN))
  yield cluster
  cluster.close()


def _generate(engine) -> dict[int, list[int]]:
  handles = {i: engine.submit("base", PROMPTS[i], max_new_tokens=NEW) for i in VICTIMS}
  return {i: h.result(timeout=300) for i, h in handles.items()}


def _layers_block(cluster) -> tuple[str, str]:
  block = next(b for b in cluster.blocks() if b["kind"] == "layers")
  cluster.hidden = cluster.zoo.load_block(block["block_id"]).config["hidden_size"]
  return block["block_id"], block["worker"]


def _run_request(block_id: str, hidden: int, rows=1, tokens=16, pages=(0,), **changes):
  """A RunBlockRequest for a layers block of width `hidden`; `changes` replace or drop
  ("x": None) inputs."""
  k = len(INT_FIELDS)
  ints = np.zeros((rows, k + len(pages)), np.int32)
  ints[:, INT_FIELDS.index("n_valid")] = tokens
  ints[:, INT_FIELDS.index("adapter")] = -1  # no adapter
  ints[:, k:] = pages
  floats = np.tile(np.array([[0.0, 1.0]], np.float32), (rows, 1))
  inputs = {"x": np.zeros((rows, tokens, hidden), np.float32), "ints": ints, "floats": floats}
  inputs.update(changes)
  request = pb.RunBlockRequest(block_id=block_id)
  to_tensor_map({k: v for k, v in inputs.items() if v is not None}, request.inputs)
  return request


def _put_rows(block_id: str, hidden: int, handle=1, rows=(0,), tokens=1, **changes):
  """A PutRowsRequest of zero rows of width `hidden`; `changes` replace fields."""
  data = changes.pop("data", np.zeros((len(rows), tokens, hidden), np.float32))
  fields = dict(handle=handle, block_id=block_id, rows=list(rows), data=to_tensor(data))
  fields.update(changes)
  return pb.PutRowsRequest(**fields)


def _code(call, *args) -> tuple[grpc.StatusCode, str]:
  try:
    call(*args, timeout=30)
  except grpc.RpcError as e:
    return e.code(), e.details()
  return grpc.StatusCode.OK, ""


def _attack(cluster, channel: grpc.Channel) -> list[tuple[str, grpc.StatusCode]]:
  """Every worker and registry RPC a stranger could send to damage the cluster."""
  block_id, _ = _layers_block(cluster)
  codes = []
  for _, address, _ in cluster.workers:
    with channel(address) as ch:
      stub = pb_grpc.BlockHostStub(ch)
      codes += [
          ("RunBlock", _code(stub.RunBlock, _run_request(block_id, cluster.hidden, pages=(0, 1, 2, 3)))[0]),
          ("UnhostBlock", _code(stub.UnhostBlock, pb.UnhostBlockRequest(block_id=block_id))[0]),
          ("HostBlock", _code(stub.HostBlock, pb.HostBlockRequest(
              block_id=block_id, batch_size=4, kv_slots=1, max_len=64, page_size=16))[0]),
          ("FreeSlots", _code(stub.FreeSlots, pb.FreeSlotsRequest(block_id=block_id,
                                                                  slots=[0]))[0]),
          ("PutRows", _code(stub.PutRows, _put_rows(block_id, cluster.hidden))[0]),
          ("TakeRows", _code(stub.TakeRows, pb.TakeRowsRequest(handle=1, rows=[0]))[0]),
          ("ReleaseRows", _code(stub.ReleaseRows, pb.ReleaseRowsRequest(handles=[1]))[0])]
  with channel(cluster.registry) as ch:
    stub = pb_grpc.RegistryStub(ch)
    codes += [("Register", _code(stub.Register, pb.RegisterRequest(
                  worker_id="intruder", address="127.0.0.1:1"))[0]),
              ("Heartbeat", _code(stub.Heartbeat, pb.HeartbeatRequest(worker_id="intruder"))[0])]
  return codes


def test_strangers_get_unauthenticated_and_the_victim_is_undisturbed(token_cluster, undisturbed):
  strangers = [lambda a: grpc.insecure_channel(a),
               lambda a: security.channel(a, security.ClusterCredentials(token=b"x" * 32)),
               lambda a: security.channel(a, security.ClusterCredentials(token=TOKEN[:-1]))]
  handles = {i: token_cluster.engine.submit("base", PROMPTS[i], max_new_tokens=NEW)
             for i in VICTIMS}
  rounds, mid_decode = 0, 0
  while not all(h.done for h in handles.values()) and rounds < 50:
    mid_decode += any(0 < len(h.tokens) < NEW for h in handles.values())
    for stranger in strangers:
      codes = _attack(token_cluster, stranger)
      assert len(codes) == 16
      assert {c for _, c in codes} == {grpc.StatusCode.UNAUTHENTICATED}, codes
    rounds += 1
  assert {i: h.result(timeout=300) for i, h in handles.items()} == undisturbed
  assert mid_decode >= 1  # attacked while the victims were decoding
  assert len(token_cluster.engine.stats()["workers"]) == 2  # no intruder registered
  # The members' own credentials pass the guard: a real call reaches the handler.
  block_id, address = _layers_block(token_cluster)
  with security.channel(address, token_cluster.credentials) as ch:
    code, details = _code(pb_grpc.BlockHostStub(ch).RunBlock,
                          _run_request(block_id, token_cluster.hidden, pages=(10 ** 6,)))
  assert code == grpc.StatusCode.INVALID_ARGUMENT and "page table" in details


@pytest.mark.parametrize("change, field", [
    (dict(block_id="f" * 64), "block_id"),
    (dict(x=None), "inputs"),
    (dict(hidden_delta=-1), "inputs['x']"),
    (dict(x=np.float16), "inputs['x']"),
    (dict(x=np.zeros((1, 16), np.float32)), "inputs['x']"),
    (dict(rows=5), "rows"),
    (dict(pages=(10 ** 6,)), "page table"),
    (dict(pages=(-10 ** 6,)), "page table"),  # -1 - page marks a read-only page; not this
    (dict(pages=tuple(range(40))), "inputs['ints']"),
    (dict(ints=np.full((1, len(INT_FIELDS) + 1), 10 ** 6, np.int32)), "starts"),
    (dict(floats=np.full((1, 2), np.nan, np.float32)), "inputs['floats']"),
    (dict(floats=np.zeros((1, 3), np.float32)), "inputs['floats']"),
])
def test_malformed_run_block_is_invalid_argument_naming_the_field(token_cluster, change, field):
  block_id, address = _layers_block(token_cluster)
  change, hidden = dict(change), token_cluster.hidden
  hidden += change.pop("hidden_delta", 0)
  if change.get("x") is np.float16:
    change["x"] = np.zeros((1, 16, hidden), np.float16)
  request = _run_request(change.pop("block_id", block_id), hidden, **change)
  with security.channel(address, token_cluster.credentials) as ch:
    code, details = _code(pb_grpc.BlockHostStub(ch).RunBlock, request)
  assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
  assert field in details


def test_malformed_host_block_registry_and_tensor_bytes_are_invalid_argument(token_cluster, undisturbed):
  block_id, address = _layers_block(token_cluster)
  good = dict(block_id=block_id, batch_size=4, kv_slots=2, max_len=64, page_size=16, kv_pages=8)
  cases = [(dict(good, block_id="not-a-block"), "block_id"),
           (dict(good, block_id="0" * 64), "block_id"),
           (dict(good, batch_size=0), "batch_size"),
           (dict(good, kv_slots=-1), "kv_slots"),
           (dict(good, max_len=0), "max_len"),
           (dict(good, page_size=-16), "page_size"),
           (dict(good, kv_pages=10 ** 9), "kv_pages")]
  torn = _run_request(block_id, token_cluster.hidden)
  torn.inputs["x"].data = torn.inputs["x"].data[:-4]  # bytes that do not fill the shape
  with security.channel(address, token_cluster.credentials) as ch:
    stub = pb_grpc.BlockHostStub(ch)
    for fields, name in cases:
      code, details = _code(stub.HostBlock, pb.HostBlockRequest(**fields))
      assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(name), details
    code, details = _code(stub.RunBlock, torn)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("inputs['x']")
  with security.channel(token_cluster.registry, token_cluster.credentials) as ch:
    stub = pb_grpc.RegistryStub(ch)
    for request, name in [
        (pb.RegisterRequest(address="no-port"), "address"),
        (pb.RegisterRequest(address="127.0.0.1:70000"), "address"),
        (pb.RegisterRequest(worker_id="w" * 200, address="127.0.0.1:1"), "worker_id"),
        (pb.RegisterRequest(address="127.0.0.1:1", devices=[pb.Device(memory_bytes=-1)]),
         "devices[0]")]:
      code, details = _code(stub.Register, request)
      assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(name), details
    for load, name in [(pb.WorkerLoad(kv_bytes=-5), "load.kv_bytes"),
                       (pb.WorkerLoad(mailbox_bytes=-1), "load.mailbox_bytes")]:
      code, details = _code(stub.Heartbeat, pb.HeartbeatRequest(worker_id="w", load=load))
      assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(name), details
  assert len(token_cluster.engine.stats()["workers"]) == 2
  assert _generate(token_cluster.engine) == undisturbed  # nothing above touched the KV


def test_mailbox_rpcs_check_every_field_and_a_full_mailbox_sends_rows_back(token_cluster,
                                                                           undisturbed):
  block_id, address = _layers_block(token_cluster)
  hidden = token_cluster.hidden
  head = next(b["block_id"] for b in token_cluster.blocks() if b["kind"] == "head"
              and b["worker"] == address) if any(
      b["kind"] == "head" and b["worker"] == address for b in token_cluster.blocks()) else None
  embed = next((b["block_id"] for b in token_cluster.blocks() if b["kind"] == "embed"
                and b["worker"] == address), None)
  dest = lambda **f: pb.RowDestination(**f)
  run_cases = [
      (dict(sources=[pb.RowSource(handle=99, row=0)], x=None), "sources[0]"),
      (dict(sources=[pb.RowSource(), pb.RowSource()]), "sources"),
      (dict(sources=[pb.RowSource(handle=99, row=5000)], x=None), "sources[0].row"),
      (dict(sources=[pb.RowSource(handle=99, row=0), pb.RowSource(handle=99, row=0)], rows=2,
            x=None), "sources[1]"),
      (dict(sources=[pb.RowSource(handle=0)], x=np.zeros((2, 16, hidden), np.float32)),
       "inputs['x']"),
      (dict(destinations=[dest(kind=pb.RowDestination.KEEP, block_id=block_id)]),
       "output_handle"),
      (dict(output_handle=7, row_destinations=[3]), "row_destinations[0]"),
      (dict(output_handle=7, destinations=[dest(kind=7)], row_destinations=[0]),
       "destinations[0].kind"),
      (dict(output_handle=7, destinations=[dest(kind=pb.RowDestination.KEEP, block_id="f" * 64)],
            row_destinations=[0]), "destinations[0].block_id"),
      (dict(output_handle=7, destinations=[dest(kind=pb.RowDestination.PUSH, address="nowhere",
                                                block_id=block_id)], row_destinations=[0]),
       "destinations[0].address"),
      (dict(output_handle=7, destinations=[dest(kind=pb.RowDestination.PUSH,
                                                address="127.0.0.1:1", block_id="")],
            row_destinations=[0]), "destinations[0].block_id")]
  torn = _put_rows(block_id, hidden)
  torn.data.data = torn.data.data[:-4]
  put_cases = [(_put_rows(block_id, hidden, handle=0), "handle"),
               (_put_rows("f" * 64, hidden), "block_id"),
               (_put_rows(block_id, hidden, rows=()), "rows"),
               (_put_rows(block_id, hidden, rows=(1, 1)), "rows"),
               (_put_rows(block_id, hidden, rows=(-1,)), "rows[0]"),
               (_put_rows(block_id, hidden + 1), "data"),
               (_put_rows(block_id, hidden, rows=(0, 1), data=np.zeros((1, 1, hidden), np.float32)),
                "data"),
               (_put_rows(block_id, hidden, data=np.zeros((1, 1, hidden), np.float16)), "data"),
               (torn, "data")]
  if embed is not None:
    put_cases.append((_put_rows(embed, hidden), "block_id"))
  with security.channel(address, token_cluster.credentials) as ch:
    stub = pb_grpc.BlockHostStub(ch)
    for fields, name in run_cases:
      fields = dict(fields)
      extra = {k: fields.pop(k) for k in ("sources", "output_handle", "destinations",
                                          "row_destinations") if k in fields}
      request = _run_request(block_id, hidden, **fields)
      for key, value in extra.items():
        getattr(request, key).extend(value) if isinstance(value, list) else setattr(
            request, key, value)
      code, details = _code(stub.RunBlock, request)
      assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(name), (name, details)
    if head is not None:
      request = _run_request(head, hidden, pages=())
      request.output_handle = 7
      code, details = _code(stub.RunBlock, request)
      assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("output_handle")
    for request, name in put_cases:
      code, details = _code(stub.PutRows, request)
      assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(name), (name, details)
    for request, name in [(pb.TakeRowsRequest(handle=0, rows=[0]), "handle"),
                          (pb.TakeRowsRequest(handle=123456789, rows=[0]), "rows[0]"),
                          (pb.TakeRowsRequest(handle=1, rows=[]), "rows")]:
      code, details = _code(stub.TakeRows, request)
      assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(name), (name, details)
    code, details = _code(stub.ReleaseRows, pb.ReleaseRowsRequest(handles=[5, 0]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("handles[1]")

    # A valid put is taken back whole, once.
    rows = np.arange(2 * 3 * hidden, dtype=np.float32).reshape(2, 3, hidden)
    assert _code(stub.PutRows, _put_rows(block_id, hidden, handle=123456789, rows=(4, 2),
                                         data=rows))[0] == grpc.StatusCode.OK
    taken = stub.TakeRows(pb.TakeRowsRequest(handle=123456789, rows=[2]), timeout=30)
    np.testing.assert_array_equal(from_tensor(taken.data), rows[1:2])
    assert _code(stub.TakeRows, pb.TakeRowsRequest(handle=123456789, rows=[2]))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.ReleaseRows, pb.ReleaseRowsRequest(handles=[123456789]))[0] == \
        grpc.StatusCode.OK
    assert _code(stub.TakeRows, pb.TakeRowsRequest(handle=123456789, rows=[4]))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT  # released

  # Full mailboxes: PutRows is RESOURCE_EXHAUSTED, and a worker sends rows it cannot keep or
  # push back to the coordinator, which sends them on itself: the same tokens.
  hosts = [host for _, _, host in token_cluster.workers]
  saved = [h.mailbox.capacity_bytes for h in hosts]
  before = token_cluster.engine.stats()["hidden_state_traffic"]
  try:
    for h in hosts:
      h.mailbox.capacity_bytes = 0
    with security.channel(address, token_cluster.credentials) as ch:
      code, details = _code(pb_grpc.BlockHostStub(ch).PutRows, _put_rows(block_id, hidden))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "mailbox full" in details
    assert _generate(token_cluster.engine) == undisturbed
  finally:
    for h, capacity in zip(hosts, saved):
      h.mailbox.capacity_bytes = capacity
  after = token_cluster.engine.stats()["hidden_state_traffic"]
  grew = lambda key: sum(after[a][key] - before.get(a, {}).get(key, 0) for a in after)
  assert grew("rows_undelivered") > 0 and grew("hidden_bytes_received") > 0
  assert grew("hidden_bytes_sent") > 0 and grew("rows_by_reference") == 0
  assert _generate(token_cluster.engine) == undisturbed


def test_an_expired_step_deadline_fails_the_request_with_a_message(token_cluster, undisturbed):
  links = token_cluster.links
  # The first batch of each shape gets the compile allowance on top of the steady-state one.
  assert links.run_deadline("w", "b", 4, 16) == pytest.approx(30 + 0.01 * 64 + 300)
  links.ran("w", "b", 4, 16)
  assert links.run_deadline("w", "b", 4, 16) == pytest.approx(30 + 0.01 * 64)
  saved = links.deadlines
  links.deadlines = StepDeadlines(step_s=1e-4, per_token_s=0, first_compile_s=0)
  try:
    with pytest.raises(Exception, match="step deadline"):
      token_cluster.engine.submit("base", PROMPTS[0], max_new_tokens=4).result(timeout=60)
  finally:
    links.deadlines = saved
  assert _generate(token_cluster.engine) == undisturbed


def test_a_worker_process_with_the_token_file_joins_and_one_without_is_refused(
    token_cluster, zoo_dir, tmp_path):
  token_file = tmp_path / "token"
  token_file.write_bytes(TOKEN + b"\n")
  common = [sys.executable, "-m", "launch.worker", f"--coordinator={token_cluster.registry}",
            f"--zoo={zoo_dir}", "--mesh_shape=1,1", "--register_timeout_s=20"]
  with_token = subprocess.Popen(common + [f"--cluster_token_file={token_file}"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    # An open worker (no token, no TLS) may not listen beyond loopback.
    without = subprocess.run(common + ["--insecure_cluster", "--host=0.0.0.0"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert without.returncode != 0 and "--host: '0.0.0.0' is reachable" in without.stderr
    address = _wait_line(with_token, r"serving on (127\.0\.0\.1:\d+)", timeout=120).group(1)
    alive = {w["address"] for w in token_cluster.engine.stats()["workers"]
             if w["state"] == "alive"}
    assert address in alive
  finally:
    with_token.terminate()
    with_token.wait(timeout=30)
    with_token.stdout.close()


def test_credentials_flags_and_loopback_only_without_them(tmp_path):
  short = tmp_path / "short"
  short.write_bytes(b"too short")
  with pytest.raises(InvalidRequestError, match="--cluster_token_file"):
    security.load_credentials(token_file=str(short))
  with pytest.raises(InvalidRequestError, match="--tls_key"):
    security.load_credentials(cert=str(short))
  with pytest.raises(InvalidRequestError, match="--host"):
    security.bind_host("0.0.0.0", security.ClusterCredentials(), "a worker")
  logged = []
  assert security.bind_host("127.0.0.1", None, "a worker", log=logged.append) == "127.0.0.1"
  assert "127.0.0.1 only" in logged[0]
  assert security.bind_host("0.0.0.0", security.ClusterCredentials(token=TOKEN), "w") == "0.0.0.0"


def _openssl(*args, cwd):
  subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(root) -> dict[str, str]:
  """A cluster CA and one member certificate (server and client use, SAN 127.0.0.1), and a
  stranger's CA and certificate."""
  ext = root / "member.ext"
  ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
  for who in ("cluster", "stranger"):
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             f"/CN={who}-ca", "-keyout", f"{who}-ca.key", "-out", f"{who}-ca.pem", cwd=root)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout",
             f"{who}.key", "-out", f"{who}.csr", cwd=root)
    _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", f"{who}-ca.pem", "-CAkey",
             f"{who}-ca.key", "-CAcreateserial", "-days", "1", "-extfile", "member.ext",
             "-out", f"{who}.pem", cwd=root)
  return {name: str(root / name) for name in os.listdir(root)}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_mutual_tls_cluster_gives_the_same_tokens(zoo_dir, undisturbed, tmp_path):
  files = _certificates(tmp_path)
  creds = security.load_credentials(None, files["cluster.pem"], files["cluster.key"],
                                    files["cluster-ca.pem"])
  cluster = Cluster(zoo_dir, creds)
  server = http = None
  try:
    assert _generate(cluster.engine) == undisturbed
    block_id, address = _layers_block(cluster)
    stranger = security.load_credentials(None, files["stranger.pem"], files["stranger.key"],
                                         files["cluster-ca.pem"])
    no_cert = grpc.ssl_channel_credentials(root_certificates=creds.ca)
    for channel in (grpc.insecure_channel(address), security.channel(address, stranger),
                    grpc.secure_channel(address, no_cert)):
      with channel:
        code, _ = _code(pb_grpc.BlockHostStub(channel).UnhostBlock,
                        pb.UnhostBlockRequest(block_id=block_id))
      assert code == grpc.StatusCode.UNAVAILABLE  # the TLS handshake refuses it
    assert _generate(cluster.engine) == undisturbed
    # The client-facing port speaks TLS with the same certificate; clients need only the CA.
    server, port = build_server(cluster.engine, 0, tls=creds)
    server.start()
    with grpc.secure_channel(f"127.0.0.1:{port}", no_cert) as channel:
      models = pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    assert [m.name for m in models.models] == ["base"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
      assert _code(pb_grpc.InferenceStub(channel).ListModels,
                   pb.ListModelsRequest())[0] == grpc.StatusCode.UNAVAILABLE
    frontend = Frontend(cluster.engine)
    http = HttpServer(frontend, 0, tls_files=(creds.cert_path, creds.key_path))
    http.start()
    context = ssl.create_default_context(cafile=files["cluster-ca.pem"])
    with urllib.request.urlopen(f"https://127.0.0.1:{http.port}/v1/models", context=context,
                                timeout=30) as response:
      assert [m["id"] for m in json.load(response)["data"]] == ["base"]
    # So does the metrics port.
    metrics = ServingMetrics(cluster.engine)
    metrics_port = metrics.start_http(free_port(), tls_files=(creds.cert_path, creds.key_path))
    try:
      with urllib.request.urlopen(f"https://127.0.0.1:{metrics_port}/metrics", context=context,
                                  timeout=30) as response:
        assert b"jblock_queue_depth 0.0" in response.read()
      with pytest.raises(OSError):  # plain HTTP gets no answer from a TLS port
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read()
    finally:
      metrics.stop_http()
  finally:
    if http is not None:
      http.stop()
      frontend.close()
    if server is not None:
      server.stop(0)
    cluster.close()
