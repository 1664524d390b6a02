"""Membership over real gRPC on 127.0.0.1: registration, heartbeats, death by silence or by a
failed RPC (listeners told once, with the reason), FAILED_PRECONDITION for a dead member, the
worker's heartbeat loop ending when its coordinator drops it or stays away, and registering again
(with the blocks it hosts) with a coordinator that restarted."""

import concurrent.futures
import threading
import time

import grpc
import pytest

from jblock.cluster import heartbeat
from jblock.cluster.membership import Membership, MembershipConfig
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc


def _registry_server(port: int = 0):
  membership = Membership(MembershipConfig(heartbeat_interval_s=0.05, dead_after_s=0.4))
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
  pb_grpc.add_RegistryServicer_to_server(membership, server)
  port = server.add_insecure_port(f"127.0.0.1:{port}")
  server.start()
  return membership, server, port


@pytest.fixture
def registry():
  """(membership, channel to its Registry service); both stopped after the test."""
  membership, server, port = _registry_server()
  channel = grpc.insecure_channel(f"127.0.0.1:{port}")
  yield membership, channel, server
  channel.close()
  server.stop(0)
  membership.stop()


def _load():
  return pb.WorkerLoad(blocks_hosted=2, resident_bytes=1000, kv_bytes=64)


def test_silence_declares_a_worker_dead_and_its_heartbeats_then_end(registry):
  membership, channel, _ = registry
  deaths = []
  membership.on_dead(lambda address, reason: deaths.append((address, reason)))
  joined = heartbeat.register(channel, "w-a", "127.0.0.1:1111", timeout=10)
  assert joined.worker_id == "w-a" and joined.heartbeat_interval_s == 0.05
  assert membership.wait_for(1, timeout=5) == ["127.0.0.1:1111"]

  stop = threading.Event()
  ended = []
  loop = threading.Thread(target=lambda: ended.append(
      heartbeat.run(channel, "w-a", 0.05, _load, stop, coordinator_timeout_s=5)))
  loop.start()
  time.sleep(0.6)  # longer than dead_after_s: the heartbeats keep it alive
  (view,) = membership.stats()
  assert view["state"] == "alive" and view["load"]["blocks_hosted"] == 2
  assert view["load"]["resident_bytes"] == 1000 and view["devices"][0]["platform"] == "cpu"
  stop.set()
  loop.join(5)
  assert ended == ["stopped"]

  deadline = time.monotonic() + 5
  while not deaths and time.monotonic() < deadline:
    time.sleep(0.02)
  assert deaths and deaths[0][0] == "127.0.0.1:1111" and "no heartbeat for" in deaths[0][1]
  assert membership.alive() == [] and membership.stats()[0]["state"] == "dead"
  with pytest.raises(grpc.RpcError) as e:
    pb_grpc.RegistryStub(channel).Heartbeat(pb.HeartbeatRequest(worker_id="w-a"), timeout=5)
  assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
  assert "declared dead" in e.value.details()
  # The worker's loop ends on that answer instead of serving nobody.
  why = heartbeat.run(channel, "w-a", 0.05, _load, threading.Event(), coordinator_timeout_s=5)
  assert why.startswith("the coordinator dropped this worker")
  assert len(deaths) == 1


def test_failed_rpc_marks_dead_once_and_bad_registrations_are_refused(registry):
  membership, channel, server = registry
  deaths = []
  membership.on_dead(lambda address, reason: deaths.append(reason))
  stub = pb_grpc.RegistryStub(channel)
  stub.Register(pb.RegisterRequest(worker_id="w-b", address="127.0.0.1:2222"), timeout=5)
  assert membership.mark_dead("127.0.0.1:2222", "RunBlock failed: UNAVAILABLE")
  assert not membership.mark_dead("127.0.0.1:2222", "again")
  assert deaths == ["RunBlock failed: UNAVAILABLE"]
  with pytest.raises(grpc.RpcError) as e:
    stub.Register(pb.RegisterRequest(worker_id="w-c"), timeout=5)
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "address" in e.value.details()
  stub.Register(pb.RegisterRequest(worker_id="w-d", address="127.0.0.1:3333"), timeout=5)
  with pytest.raises(grpc.RpcError) as e:
    stub.Register(pb.RegisterRequest(worker_id="w-d", address="127.0.0.1:4444"), timeout=5)
  assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS

  # The coordinator goes away: heartbeats fail, the loop gives up after its timeout.
  server.stop(0)
  t0 = time.monotonic()
  why = heartbeat.run(channel, "w-d", 0.05, _load, threading.Event(), coordinator_timeout_s=0.5)
  assert why.startswith("no answer from the coordinator for") and time.monotonic() - t0 < 5


def test_a_worker_outlives_its_coordinator_and_joins_the_restarted_one_with_its_blocks():
  membership, server, port = _registry_server()
  channel = grpc.insecure_channel(f"127.0.0.1:{port}")
  hosted = ["b" * 64, "c" * 64]
  rejoins, said = [], []

  def rejoin():
    rejoins.append(time.monotonic())
    return heartbeat.register(channel, "w-r", "127.0.0.1:5555", timeout=5, hosted=hosted)

  heartbeat.register(channel, "w-r", "127.0.0.1:5555", timeout=5)
  stop = threading.Event()
  ended = []
  loop = threading.Thread(target=lambda: ended.append(heartbeat.run(
      channel, "w-r", 0.05, _load, stop, coordinator_timeout_s=30, rejoin=rejoin,
      progress=said.append)))
  loop.start()
  try:
    time.sleep(0.2)
    server.stop(0)  # the coordinator dies; the worker keeps trying
    membership.stop()
    time.sleep(1.5)
    assert not ended and not rejoins
    assert any("does not answer" in line for line in said)
    restarted, server, _ = _registry_server(port)  # same address, knows nobody
    try:
      addresses = restarted.wait_for(1, timeout=10)
      assert addresses == ["127.0.0.1:5555"] and len(rejoins) == 1
      assert restarted.hosted() == {"b" * 64: ["127.0.0.1:5555"], "c" * 64: ["127.0.0.1:5555"]}
      time.sleep(0.3)  # its heartbeats keep it alive in the new registry
      assert restarted.alive() == ["127.0.0.1:5555"] and not ended
      assert "jblock: registered again with a restarted coordinator" in said
    finally:
      restarted.stop()
  finally:
    stop.set()
    loop.join(5)
    server.stop(0)
    channel.close()
  assert ended == ["stopped"]
