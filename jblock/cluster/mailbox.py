"""A worker's mailbox: hidden rows kept for the batches this worker runs next.

When consecutive blocks of a chain live on workers, the output rows of a batch stay on (or go
straight to) the worker of the next block instead of travelling through the coordinator. Rows
are kept under the handle the coordinator gave the batch that produced them, one entry per
(handle, row); the next batch's RunBlock names them as its sources.

Memory is bounded: a put that would pass `capacity_bytes` is refused (the caller sends the rows
back to the coordinator instead, as without a mailbox); a row is freed once a batch read it, when
the coordinator releases its handle (its request ended, was paused or moved), or after `ttl_s`
unread (a leak stop; the coordinator normally releases long before).
"""

import dataclasses
import threading
import time
from typing import Any, Iterable, Sequence

from jblock.errors import InvalidRequestError


@dataclasses.dataclass(eq=False)
class _Part:
  """One array of rows put under a handle (a batch's output kept here, or one PutRows)."""
  array: Any  # [rows, tokens, hidden]: a device array (kept here) or numpy (pushed here)
  nbytes: int
  left: int  # rows not yet read or released
  created: float


class Mailbox:

  def __init__(self, capacity_bytes: int = 1 << 30, ttl_s: float = 300.0):
    self.capacity_bytes = capacity_bytes
    self.ttl_s = ttl_s
    self._rows: dict[tuple[int, int], tuple[_Part, int]] = {}  # (handle, row) -> (part, index)
    self._bytes = 0
    self._lock = threading.Lock()
    self.expired = 0  # rows dropped unread after ttl_s

  def put(self, handle: int, rows: Sequence[int], array, indices: Sequence[int] | None = None
          ) -> bool:
    """Keeps `array[indices[i]]` as row `rows[i]` of `handle` (indices default 0..n-1);
    False (nothing kept) when that would pass the capacity."""
    nbytes = int(array.nbytes)
    with self._lock:
      self._expire(time.monotonic())
      if self._bytes + nbytes > self.capacity_bytes:
        return False
      part = _Part(array, nbytes, len(rows), time.monotonic())
      for i, row in enumerate(rows):
        old = self._rows.pop((handle, row), None)
        if old is not None:
          self._drop(old[0])
        self._rows[handle, row] = (part, indices[i] if indices is not None else i)
      self._bytes += nbytes
      return True

  def lookup(self, refs: Iterable[tuple[int, int]], field: str = "sources"
             ) -> list[tuple[Any, int]]:
    """(array, index) of each (handle, row); InvalidRequestError naming the first one missing."""
    out = []
    with self._lock:
      for i, (handle, row) in enumerate(refs):
        entry = self._rows.get((handle, row))
        if entry is None:
          raise InvalidRequestError(f"{field}[{i}]", f"handle {handle} row {row} is not in this "
                                    f"worker's mailbox")
        out.append((entry[0].array, entry[1]))
    return out

  def consume(self, refs: Iterable[tuple[int, int]]) -> None:
    """Frees rows a batch has read (a part's array goes once all its rows are gone)."""
    with self._lock:
      for key in refs:
        entry = self._rows.pop(tuple(key), None)
        if entry is not None:
          self._drop(entry[0])

  def release(self, handles: Iterable[int]) -> int:
    """Frees every row of these handles; returns how many rows were freed."""
    wanted = set(handles)
    with self._lock:
      keys = [k for k in self._rows if k[0] in wanted]
      for key in keys:
        self._drop(self._rows.pop(key)[0])
      return len(keys)

  def clear(self) -> int:
    """Frees every row (a new coordinator numbers its handles afresh); returns how many."""
    with self._lock:
      count = len(self._rows)
      self._rows.clear()
      self._bytes = 0
      return count

  def _drop(self, part: _Part) -> None:
    part.left -= 1
    if part.left == 0:
      self._bytes -= part.nbytes

  def _expire(self, now: float) -> None:
    old = [k for k, (part, _) in self._rows.items() if now - part.created > self.ttl_s]
    for key in old:
      self._drop(self._rows.pop(key)[0])
    self.expired += len(old)

  def stats(self) -> dict[str, int]:
    with self._lock:
      return {"rows": len(self._rows), "bytes": self._bytes}
