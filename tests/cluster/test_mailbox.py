"""Hidden rows left on workers: the worker's mailbox (bounded, freed when read or released, a
leak stop after its TTL) and the coordinator's side (where each row goes next, which rows a
RunBlock names by reference, rows read by a block of the coordinator's own, releases)."""

import gc
import types

import numpy as np
import pytest

from jblock.cluster import rows as rows_lib
from jblock.cluster.mailbox import Mailbox
from jblock.errors import InvalidRequestError
from jblock.proto import jblock_pb2 as pb
from jblock.runtime.executor import stage_input

ROW = np.arange(2 * 4, dtype=np.float32).reshape(1, 2, 4)  # one row: 2 tokens, width 4


def test_mailbox_is_bounded_and_frees_rows_read_released_or_expired(monkeypatch):
  now = [1000.0]
  monkeypatch.setattr("jblock.cluster.mailbox.time.monotonic", lambda: now[0])
  box = Mailbox(capacity_bytes=3 * ROW.nbytes, ttl_s=60.0)
  batch = np.concatenate([ROW, ROW + 1])
  assert box.put(7, [3, 5], batch)
  assert box.stats() == {"rows": 2, "bytes": batch.nbytes}
  assert not box.put(8, [0, 1], batch)  # past the capacity: refused, nothing kept
  (array, index), = box.lookup([(7, 5)])
  np.testing.assert_array_equal(array[index], ROW[0] + 1)
  with pytest.raises(InvalidRequestError, match=r"sources\[1\]: handle 7 row 4 is not"):
    box.lookup([(7, 3), (7, 4)])
  box.consume([(7, 3)])
  assert box.stats() == {"rows": 1, "bytes": batch.nbytes}  # the array goes with its last row
  box.consume([(7, 5)])
  assert box.stats() == {"rows": 0, "bytes": 0}
  assert box.put(9, [0], ROW) and box.put(10, [0], ROW, indices=[0])
  assert box.release([9, 11]) == 1 and box.stats() == {"rows": 1, "bytes": ROW.nbytes}
  assert box.put(12, [0], ROW)
  now[0] += 61.0  # row 0 of handle 10 and of 12 were never read: dropped at the next put
  assert box.put(13, [0], ROW)
  assert box.stats() == {"rows": 1, "bytes": ROW.nbytes} and box.expired == 2


class _Ledger(rows_lib.RowLedger):
  """A ledger whose TakeRows answers from a dict instead of a worker."""

  def __init__(self, held):
    super().__init__(links=None)
    self.held = held

  def take(self, address, handle, row):
    self.count(address, hidden_bytes_received=ROW.nbytes, rows_received=1)
    return self.held.pop((address, handle, row))


def _remote(address="w1:1"):
  return types.SimpleNamespace(address=address, available=True, remote=True, block_id="blk")


def _item(x, pos=0, final=True, segments=None, last_kv=1):
  req = types.SimpleNamespace(segments=segments or [], last_kv_segment=last_kv)
  return types.SimpleNamespace(x=x, pos=pos, final=final, req=req)


def test_route_names_each_rows_next_block_and_stage_reads_rows_by_reference():
  seg = lambda inst: types.SimpleNamespace(instances=[inst])
  here, there, local = _remote("w1:1"), _remote("w2:2"), types.SimpleNamespace(
      block_id="l", remote=False, available=True, address="")
  chains = [[seg(None), seg(here)], [seg(None), seg(there)], [seg(None), seg(local)]]
  items = [_item(None, segments=c) for c in chains]
  items.append(_item(None, final=False, segments=chains[0], last_kv=0))  # a prompt chunk
  batch = types.SimpleNamespace(items=items)
  request = pb.RunBlockRequest()
  rows_lib.route(request, batch, "w1:1", handle=5)
  kinds = [(d.kind, d.address, d.block_id) for d in request.destinations]
  assert kinds == [(rows_lib.KEEP, "", "blk"), (rows_lib.PUSH, "w2:2", "blk"),
                   (rows_lib.RETURN, "", "")]
  assert list(request.row_destinations) == [0, 1, 2, rows_lib.DROPPED]

  # The worker kept row 0 and pushed row 1; row 2 came back.
  response = pb.RunBlockResponse(returned_rows=[2], bytes_pushed=ROW.nbytes)
  response.outputs["y"].CopyFrom(pb.Tensor(dtype="float32", shape=[1, 2, 4],
                                           data=(ROW + 2).tobytes()))
  ledger = _Ledger({("w1:1", 5, 3): ROW + 3})
  out = rows_lib.received(ledger, request, response, "w1:1")
  assert out.where == {0: "w1:1", 1: "w2:2"}
  assert ledger.stats()["w1:1"]["rows_kept"] == 1 == ledger.stats()["w1:1"]["rows_pushed"]
  assert ledger.stats()["w1:1"]["hidden_bytes_received"] == ROW.nbytes

  # The next batch on w2 names row 1 by reference and carries row 2 (returned) by value.
  nxt = types.SimpleNamespace(segment=types.SimpleNamespace(starts_at_embed=False),
                              items=[_item((out, 1)), _item((out, 2))], b_pad=2)
  x, sources, by_reference = rows_lib.stage(nxt, "w2:2")
  assert [(s.handle, s.row) for s in sources] == [(5, 1), (0, 0)]
  np.testing.assert_array_equal(x, ROW + 2)
  assert by_reference == [(out, 1)] and out.where == {0: "w1:1"}
  rows_lib.unread(by_reference, "w2:2")  # that RunBlock failed: row 1 is still out there
  assert out.where == {0: "w1:1", 1: "w2:2"}

  # A block of the coordinator's own reads a row held by a worker: taken back from it.
  out.where[3] = "w1:1"
  local_batch = types.SimpleNamespace(segment=types.SimpleNamespace(starts_at_embed=False),
                                      items=[_item((out, 2)), _item((out, 3))], b_pad=2)
  np.testing.assert_array_equal(stage_input(local_batch), np.concatenate([ROW + 2, ROW + 3]))
  assert ledger.stats()["w1:1"]["rows_received"] == 2

  # Once nothing refers to it, its unread rows are queued for release on their workers.
  del out, nxt, local_batch, by_reference
  gc.collect()
  assert sorted(ledger._pending) == [("w1:1", 5), ("w2:2", 5)]
