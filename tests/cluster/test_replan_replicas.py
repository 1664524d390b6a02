"""Applying plans with copies (Replanner.apply) on a recording engine: which replicas are
hosted and drained, and which primaries move, in which order."""

import pytest

from jblock.cluster.replan import ReplanConfig, Replanner


class _Placer:
  def __init__(self, plan):
    self.plan = dict(plan)

  def placed(self, key, worker):
    self.plan[key] = worker


class _Engine:
  """Records the calls; applies them to the placer as a cluster engine's instances would."""

  def __init__(self, placer):
    self.placer, self.calls = placer, []

  def add_replica(self, block_id, key):
    self.calls.append(("add", key, self.placer.plan[key]))
    return key

  def drop_replica(self, key, timeout):
    self.calls.append(("drop", key, timeout))
    del self.placer.plan[key]

  def relocate(self, keys, reason, to):
    self.calls.append(("move", tuple(keys), to))
    for k in keys:
      self.placer.plan[k] = to

  def stats(self):
    return {"blocks": [{"block_id": k.split("#")[0], "key": k} for k in self.placer.plan]}


def _replanner(plan):
  placer = _Placer(plan)
  engine = _Engine(placer)
  return Replanner(engine, placer, None, None, None, ReplanConfig(drain_s=7.0)), engine


def test_copies_are_hosted_drained_and_a_leaving_primary_moves_after_its_target_is_freed():
  r, engine = _replanner({"a": "w1", "b": "w1"})
  r.apply({"a": ["w1", "w2"], "b": ["w1"]}, "hot")
  assert engine.calls == [("add", "a#1", "w2")]
  assert r.copies() == {"a": {"a": "w1", "a#1": "w2"}, "b": {"b": "w1"}}
  engine.calls.clear()
  # a leaves w1 for w2, where its replica lives: the replica drains first, then a moves there.
  r.apply({"a": ["w2"]}, "w1 is busy")
  assert engine.calls == [("drop", "a#1", 7.0), ("move", ("a",), "w2")]
  assert r.copies()["a"] == {"a": "w2"}
  engine.calls.clear()
  r.apply({"a": ["w3", "w1"]}, "spread")  # a moves to w3 and gets a replica on w1
  assert engine.calls == [("add", "a#1", "w1"), ("move", ("a",), "w3")]
  engine.calls.clear()
  r.apply({"a": ["w3"]}, "cooled")
  assert engine.calls == [("drop", "a#1", 7.0)]


def test_bad_hosts_are_refused_naming_the_block():
  r, engine = _replanner({"a" * 64: "w1"})
  with pytest.raises(ValueError, match="bbbbbbbbbbbb.*not hosted"):
    r.apply({"b" * 64: ["w1"]}, "x")
  with pytest.raises(ValueError, match="aaaaaaaaaaaa.*distinct workers"):
    r.apply({"a" * 64: []}, "x")
  with pytest.raises(ValueError, match="distinct workers"):
    r.apply({"a" * 64: ["w1", "w1"]}, "x")
  assert engine.calls == []
