"""Block replicas in one engine: the binding rule, requests balanced over a shared block's
copies (each copy runs batches, tokens unchanged), and a removed copy's requests moved onto the
primary with a KV replay when its drain times out."""

import pytest

from jblock.errors import InvalidRequestError, NotFoundError
from jblock.runtime import replicas
from jblock.runtime.engine import Engine
from tests.runtime.test_engine_core import CONFIG, NEW, PROMPTS
from tests.runtime.test_engine_core import expected, specs  # noqa: F401 (fixtures)
from tests.serving.serving_helpers import wait_until


def test_binding_rule_takes_the_least_loaded_usable_copy():
  opt = replicas.Option
  # Load is requests over batch size: 3/4 on the primary beats 2/2 on the replica.
  assert replicas.choose([opt("b", 3, 4), opt("b#1", 2, 2)]) == "b"
  assert replicas.choose([opt("b", 3, 4), opt("b#1", 1, 2)]) == "b#1"
  assert replicas.choose([opt("b", 1, 4), opt("b#1", 1, 4)]) == "b"  # ties: the primary
  assert replicas.choose([opt("b", 0, 4), opt("b#1", 5, 4, usable=False),
                          opt("b#2", 1, 4)]) == "b"
  assert replicas.choose([opt("b", 0, 4, usable=False), opt("b#1", 9, 4)]) == "b#1"
  assert replicas.choose([opt("b", 0, 4, usable=False)]) is None
  assert replicas.block_of("b#2") == "b" and replicas.replica_key("b", 0) == "b"
  assert replicas.next_key("b", ["b", "b#1", "b#3"]) == "b#2"
  with pytest.raises(ValueError):
    replicas.replica_key("b", -1)


def _copies(engine, block_id):
  return {c["key"]: c for c in engine.stats()["replicas"][block_id]}


def test_requests_balance_over_copies_and_a_dropped_copy_replays_onto_the_primary(
    specs, expected):
  with Engine(specs, config=CONFIG, mesh_shape=(1, 1)) as engine:
    shared = [b for b in engine.stats()["blocks"] if b["models"] == ["base", "tuned"]]
    bottom = [b["block_id"] for b in shared if b["kind"] != "head"]  # embed + 2 layers: fused
    with pytest.raises(NotFoundError):
      engine.add_replica("0" * 64)
    with pytest.raises(InvalidRequestError):
      engine.add_replica(bottom[0], key=bottom[1] + "#1")
    keys = [engine.add_replica(b) for b in bottom]
    assert keys == [b + "#1" for b in bottom]
    jobs = [(("base", "tuned")[i % 2], i) for i in range(4)]
    handles = [engine.submit(m, PROMPTS[i], max_new_tokens=NEW) for m, i in jobs]
    assert [h.result(120) for h in handles] == [expected[m][i] for m, i in jobs]
    for b in bottom:  # both copies ran batches of both models' requests
      copies = _copies(engine, b)
      assert copies[b]["batches_run"] > 0 and copies[b + "#1"]["batches_run"] > 0, copies
    assert engine.stats()["reroute"]["replica_bindings"] >= 2
    segments = {s for batch in engine.trace() for s in [batch["blocks"]]}
    # The replica's run stays one fused call, like the primary's.
    assert len({s for s in segments if s[0] == bottom[0][:12]}) == 1

    # Dropping the copies with no drain time moves their requests onto the primaries
    # mid-decode (KV replayed there); tokens unchanged, the copies' KV freed.
    # Two requests: one per copy (the primary takes ties), so the primary has room for both.
    handles = [engine.submit(m, PROMPTS[i], max_new_tokens=NEW) for m, i in jobs[:2]]
    wait_until(lambda: all(len(h.tokens) >= 2 for h in handles), timeout=120)
    assert {c["key"]: c["requests"] for c in _copies(engine, bottom[0]).values()} == {
        bottom[0]: 1, keys[0]: 1}
    moved = engine.drop_replica(keys[0], timeout=0.0)["requests_moved"]
    moved += sum(engine.drop_replica(k, timeout=0.0)["requests_moved"] for k in keys[1:])
    assert [h.result(120) for h in handles] == [expected[m][i] for m, i in jobs[:2]]
    assert moved >= 1
    assert engine.stats()["reroute"]["replica_unbound"] == moved
    stats = engine.stats()
    assert stats["replicas"] == {} and not any("#" in b["key"] for b in stats["blocks"])
    assert all(b["kv_slots_used"] == 0 for b in stats["blocks"])
    with pytest.raises(NotFoundError):
      engine.drop_replica(keys[0])
