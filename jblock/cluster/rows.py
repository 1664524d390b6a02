"""The coordinator's side of hidden rows that stay with the workers (jblock.cluster.mailbox).

A RunBlock of a hidden-state segment on a worker names, per output row, where the row goes
next: the same worker (kept in its mailbox), another worker (pushed there by PutRows), the
coordinator (a block of its own runs next: returned, as without mailboxes), or nowhere (a
non-final prompt chunk past the last KV block). The coordinator gets back a `RemoteRows`: the
scheduler routes `(remote_rows, row)` like any output, and the next RunBlock names the row by
(handle, row) instead of carrying it. Only rows whose next block is elsewhere than where they
are cross the coordinator, counted per worker in `RowLedger.stats`.

Rows no batch will read (the request ended, was paused, or moved to another block) are released:
when the last step item referring to a `RemoteRows` goes, its unread rows are released on their
workers by a background ReleaseRows.
"""

import collections
import itertools
import threading
import weakref
from typing import Any

import grpc
import numpy as np

from jblock.errors import UnavailableError
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc
from jblock.proto.tensor_codec import from_tensor
from jblock.runtime.step import BlockBatch

RETURN, KEEP, PUSH = pb.RowDestination.RETURN, pb.RowDestination.KEEP, pb.RowDestination.PUSH
DROPPED = -1  # row_destinations entry of a row no block reads

# Per-worker counters of what crosses the coordinator (bytes) and how rows moved.
COUNTERS = ("hidden_bytes_sent", "hidden_bytes_received", "token_bytes_sent",
            "token_bytes_received", "meta_bytes_sent", "rows_sent", "rows_received",
            "rows_by_reference", "rows_kept", "rows_pushed", "bytes_pushed", "rows_dropped",
            "rows_undelivered", "rows_taken_back", "handles_released")


class RemoteRows:
  """A batch's hidden output rows: those held by workers (by address) and those returned."""

  def __init__(self, ledger: "RowLedger", handle: int, where: dict[int, str],
               returned: np.ndarray | None, index: dict[int, int]):
    self.handle = handle
    self.where = where  # row -> address of the worker whose mailbox holds it (unread rows)
    self.returned, self.index = returned, index  # rows that came back: row -> index in returned
    self._ledger = ledger
    weakref.finalize(self, ledger.release_later, handle, where)

  def host_row(self, row: int) -> tuple[np.ndarray, int]:
    """The row on this process (a block of the coordinator's own reads it): returned, or taken
    back from the worker holding it."""
    if row in self.index:
      return self.returned, self.index[row]
    address = self.where.pop(row, None)
    if address is None:
      raise UnavailableError(f"hidden row {row} of batch handle {self.handle} was dropped by "
                             f"its worker (no block was to read it)")
    return self._ledger.take(address, self.handle, row), 0


class RowLedger:
  """Mailbox handles, the traffic each worker exchanges with the coordinator, and releases."""

  def __init__(self, links):
    self.links = links  # jblock.cluster.links.ClusterLinks: credentials and deadlines
    # False: every output row comes back to the coordinator (the earlier data path, kept for
    # side-by-side benchmarks).
    self.worker_to_worker = True
    self._handles = itertools.count(1)
    self._counters: dict[str, collections.Counter] = {}
    self._lock = threading.Lock()
    self._pending: collections.deque = collections.deque()  # (address, handle) to release
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._stubs: dict[str, Any] = {}
    self._channels: list = []

  def new_handle(self) -> int:
    with self._lock:
      if self._thread is None:
        self._thread = threading.Thread(target=self._release_loop, name="jblock-release-rows",
                                        daemon=True)
        self._thread.start()
    return next(self._handles)

  def count(self, address: str, **amounts: int) -> None:
    with self._lock:
      self._counters.setdefault(address, collections.Counter()).update(amounts)

  def stats(self) -> dict[str, dict[str, int]]:
    with self._lock:
      return {a: {k: int(c[k]) for k in COUNTERS} for a, c in self._counters.items()}

  def _stub(self, address: str):
    with self._lock:
      stub = self._stubs.get(address)
      if stub is None:
        channel = self.links.channel(address)
        self._channels.append(channel)
        stub = self._stubs[address] = pb_grpc.BlockHostStub(channel)
      return stub

  def take(self, address: str, handle: int, row: int) -> np.ndarray:
    """Row `row` of `handle` from the mailbox of `address`, as [1, tokens, hidden]."""
    try:
      response = self._stub(address).TakeRows(pb.TakeRowsRequest(handle=handle, rows=[row]),
                                              timeout=self.links.deadlines.step_s)
    except grpc.RpcError as e:
      raise UnavailableError(f"hidden row {row} of batch handle {handle} could not be taken "
                             f"back from worker {address}: {e.code().name}: {e.details()}") from e
    data = from_tensor(response.data)
    self.count(address, hidden_bytes_received=data.nbytes, rows_received=1, rows_taken_back=1)
    return data

  def release_later(self, handle: int, where: dict[int, str]) -> None:
    """Queues the release of `handle`'s unread rows (runs in finalizers: takes no lock)."""
    for address in set(where.values()):
      self._pending.append((address, handle))
    if where:
      self._wake.set()

  def _release_loop(self) -> None:
    while not self._stop.is_set():
      self._wake.wait(0.5)
      self._wake.clear()
      by_address: dict[str, list[int]] = {}
      while self._pending:
        address, handle = self._pending.popleft()
        by_address.setdefault(address, []).append(handle)
      for address, handles in by_address.items():
        try:
          self._stub(address).ReleaseRows(pb.ReleaseRowsRequest(handles=handles),
                                          timeout=self.links.deadlines.unhost_s)
          self.count(address, handles_released=len(handles))
        except grpc.RpcError:
          pass  # the worker is gone, and its mailbox with it

  def close(self) -> None:
    self._stop.set()
    self._wake.set()
    if self._thread is not None:
      self._thread.join(5.0)
    with self._lock:
      for channel in self._channels:
        channel.close()
      self._channels.clear()
      self._stubs.clear()


def stage(batch: BlockBatch, address: str
          ) -> tuple[np.ndarray | None, list[pb.RowSource], list[tuple[RemoteRows, int]]]:
  """A RunBlock's input for the worker at `address`: (x, sources, rows read by reference).

  At an embed x is the tokens and there are no sources. Otherwise rows held in that worker's
  mailbox are named by (handle, row), and the others (rows from the coordinator's own blocks,
  returned rows, rows held elsewhere) travel in x; no sources and every row in x [b_pad, T, D]
  when no row is held there.
  """
  from jblock.runtime.executor import gather_rows, stage_input
  if batch.segment.starts_at_embed:
    return stage_input(batch), [], []
  refs = [it.x for it in batch.items]
  by_reference = [(src, row) for src, row in refs
                  if isinstance(src, RemoteRows) and src.where.get(row) == address]
  if not by_reference:
    return np.asarray(gather_rows([_host(src, row) for src, row in refs], batch.b_pad)), [], []
  sources, values = [], []
  for src, row in refs:
    if isinstance(src, RemoteRows) and src.where.get(row) == address:
      del src.where[row]  # read here: the worker frees it
      sources.append(pb.RowSource(handle=src.handle, row=row))
    else:
      sources.append(pb.RowSource(handle=0, row=0))
      values.append(_host(src, row))
  x = np.asarray(gather_rows(values, len(values))) if values else None
  return x, sources, by_reference


def unread(by_reference: list[tuple[RemoteRows, int]], address: str) -> None:
  """Rows named in a RunBlock that failed: left for their release (the worker may hold them)."""
  for src, row in by_reference:
    src.where[row] = address


def _host(src, row: int):
  """(array, index) of a row that travels by value."""
  if isinstance(src, RemoteRows):
    return src.host_row(row)
  return src, row


def route(request: pb.RunBlockRequest, batch: BlockBatch, address: str, handle: int) -> None:
  """Fills the request's output routing: where each row's next block lives."""
  request.output_handle = handle
  index: dict[tuple, int] = {}
  for it in batch.items:
    req = it.req
    if not it.final and it.pos >= req.last_kv_segment:
      request.row_destinations.append(DROPPED)  # the next prompt chunk starts at the embed again
      continue
    nxt = req.segments[it.pos + 1].instances[0] if it.pos + 1 < len(req.segments) else None
    where = nxt.address if nxt is not None and nxt.remote and nxt.available else ""
    if not where:
      key = (RETURN, "", "")
    else:
      key = (KEEP if where == address else PUSH, where if where != address else "", nxt.block_id)
    if key not in index:
      index[key] = len(request.destinations)
      request.destinations.append(pb.RowDestination(kind=key[0], address=key[1], block_id=key[2]))
    request.row_destinations.append(index[key])


def received(ledger: RowLedger, request: pb.RunBlockRequest, response: pb.RunBlockResponse,
             address: str) -> RemoteRows:
  """The RemoteRows of a RunBlock answered with output rows kept, pushed or returned."""
  returned = from_tensor(response.outputs["y"]) if "y" in response.outputs else None
  index = {row: i for i, row in enumerate(response.returned_rows)}
  where = {}
  kept = pushed = dropped = 0
  for row, d in enumerate(request.row_destinations):
    if d == DROPPED:
      dropped += 1
      continue
    dest = request.destinations[d]
    if row in index or dest.kind == RETURN:
      continue
    where[row] = address if dest.kind == KEEP else dest.address
    kept += dest.kind == KEEP
    pushed += dest.kind == PUSH
  ledger.count(address, hidden_bytes_received=returned.nbytes if returned is not None else 0,
               rows_received=len(index), rows_kept=kept, rows_pushed=pushed,
               bytes_pushed=response.bytes_pushed, rows_dropped=dropped,
               rows_undelivered=len(response.undelivered))
  return RemoteRows(ledger, request.output_handle, where, returned, index)
