"""The KV manager: each layers instance owns a pool of fixed-size, refcounted pages.

A request holds one lease in every layers instance of its chain (keyed by instance, not by
chain position). A lease reserves the pages the request can ever need (prompt + max new
tokens), so a running request never runs out of KV and nothing needs preempting; memory
follows each request's real length instead of the engine's `max_seq_len`.

Prefix caching (vLLM's automatic prefix caching, at block-instance granularity). A full page
is registered under a key once its KV is written: (the chain upstream of the instance, the
hash of every token up to the page's end). Identical keys mean bit-identical KV, so a later
lease adopts a registered page instead of computing it: the same prompt prefix of the same
model, and of every model that shares the instance *and everything below it* (the bottom
blocks of partial fine-tunes: the cross-variant prefix). A page no lease holds stays cached in
an LRU until its room is needed; eviction never touches a page in use.

A page a lease adopted, or registered itself, is read-only for that lease: its page table
entry is encoded as `-1 - page` (jblock.models.attention reads it, drops writes to it), so a
recomputed or replayed position never rewrites KV that other requests read.
"""

import collections
import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from jblock.errors import OverloadedError

_DIGEST = 16  # bytes of a page key's token hash (blake2b)


def pages_for(tokens: int, page_size: int) -> int:
  return -(-tokens // page_size)


def read_only(page: int) -> int:
  """The page table entry of a page this row reads but must not write."""
  return -1 - page


def token_hashes(tokens: Sequence[int], page_size: int, known: list[bytes]) -> list[bytes]:
  """Extends `known` (hashes of the first pages) to every full page of `tokens`: hash i covers
  tokens [0, (i + 1) * page_size) as a chain (parent hash, the page's ids)."""
  full = len(tokens) // page_size
  for i in range(len(known), full):
    parent = known[i - 1] if i else b""
    ids = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
    known.append(hashlib.blake2b(parent + ids, digest_size=_DIGEST).digest())
  return known


@dataclasses.dataclass(eq=False)
class Lease:
  pool: "PagePool"
  owner: str  # request id
  pages: list[int]  # logical page i of the request -> physical page
  upstream: bytes | None = None  # what this pool's KV depends on besides tokens; None: no caching
  read_only: set[int] = dataclasses.field(default_factory=set)  # logical pages never written
  registered: int = 0  # logical pages [0, registered) are committed (registered or skipped)

  def release(self) -> None:
    self.pool.release(self)


@dataclasses.dataclass
class CacheCounters:
  queried_pages: int = 0  # pages looked up at adoption
  hit_pages: int = 0  # pages adopted from the cache
  registered_pages: int = 0
  evicted_pages: int = 0


class PagePool:
  """`num_pages` pages of `page_size` tokens, at most `max_leases` leases at once, with the
  prefix cache described in the module docstring (off when `caching` is False or under a
  sliding window, whose ring of pages reuses them)."""

  def __init__(self, num_pages: int, page_size: int, max_leases: int, caching: bool = True):
    self.num_pages = num_pages
    self.page_size = page_size
    self.max_leases = max_leases
    self.caching = caching
    self.window = 0  # > 0: every layer attends at most this far back (see lease_tokens)
    self._free = list(range(num_pages - 1, -1, -1))  # uncached free pages (a stack)
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
    self._refs = [0] * num_pages
    self._key_of: dict[int, tuple[bytes, bytes]] = {}  # registered page -> its key
    self._page_of: dict[tuple[bytes, bytes], int] = {}
    self._leases: dict[int, Lease] = {}
    self.counters = CacheCounters()

  @property
  def cacheable(self) -> bool:
    return self.caching and not self.window

  def lease_tokens(self, tokens: int, chunk: int) -> int:
    """Tokens of KV a request of `tokens` tokens needs here. Under a sliding window only what a
    chunk of `chunk` queries can reach stays live: a ring of pages (logical page j lives in ring
    slot j % ring) covering window + chunk positions and one page of slack."""
    if not self.window:
      return tokens
    ring = (pages_for(self.window + chunk - 1, self.page_size) + 1) * self.page_size
    return min(tokens, ring)

  @property
  def free_pages(self) -> int:
    """Pages a new lease may take: the free ones and the cached ones nobody holds."""
    return len(self._free) + len(self._evictable)

  @property
  def cached_pages(self) -> int:
    return len(self._key_of)

  @property
  def used_pages(self) -> int:
    """Pages some lease holds (a page shared by several leases counts once)."""
    return self.num_pages - self.free_pages

  @property
  def leases(self) -> int:
    return len(self._leases)

  def table(self, lease: Lease, width: int) -> list[int]:
    """The lease's first `width` logical pages (ring-mapped under a window); read-only pages
    encoded (`read_only`)."""
    pages = lease.pages
    if lease.read_only:
      pages = [read_only(p) if j in lease.read_only else p for j, p in enumerate(pages)]
    if len(pages) >= width:
      return pages[:width]
    return [pages[j % len(pages)] for j in range(width)] if self.window else pages

  def can_lease(self, tokens: int, count: int = 1) -> bool:
    return (self.leases + count <= self.max_leases
            and self.free_pages >= count * pages_for(tokens, self.page_size))

  def lease(self, owner: str, tokens: int, upstream: bytes | None = None,
            hashes: Sequence[bytes] = ()) -> Lease:
    """Pages for `tokens` tokens. With `upstream` (and the request's token `hashes`), the lease
    first adopts the cached pages of its longest registered prefix (read-only for it; taken
    before any fresh page, so taking those never evicts them) and keys its commits by it."""
    need = pages_for(tokens, self.page_size)
    if self.leases >= self.max_leases or need > self.free_pages:
      raise OverloadedError(f"no KV room for {tokens} tokens ({need} pages; "
                            f"{self.free_pages} free, {self.leases}/{self.max_leases} leases)")
    lease = Lease(self, owner, [])
    if upstream is not None and self.cacheable:
      lease.upstream = upstream
      self._adopt(lease, hashes[:need])
    lease.pages += [self._take() for _ in range(need - len(lease.pages))]
    self._leases[id(lease)] = lease
    return lease

  def release(self, lease: Lease) -> None:
    """Drops the lease's hold on its pages; the last holder of a registered page keeps it
    cached (the tail of a prefix is evicted before its head)."""
    if self._leases.pop(id(lease), None) is None:
      return
    for page in reversed(lease.pages):
      self._unref(page)
    lease.pages = []
    lease.read_only.clear()

  # ---- prefix caching -------------------------------------------------------------------------

  def _adopt(self, lease: Lease, hashes: Sequence[bytes]) -> None:
    """Appends the cached pages of the longest registered prefix of `hashes` to a new lease."""
    self.counters.queried_pages += len(hashes)
    for h in hashes:
      page = self._page_of.get((lease.upstream, h))
      if page is None:
        break
      self._ref(page)
      lease.read_only.add(len(lease.pages))
      lease.pages.append(page)
    lease.registered = len(lease.pages)
    self.counters.hit_pages += len(lease.pages)

  def commit(self, lease: Lease, hashes: Sequence[bytes], full_pages: int) -> None:
    """Registers the lease's pages [registered, full_pages): their KV is written now. A page whose
    key another page already holds (computed concurrently) stays private."""
    if lease.upstream is None or not self.cacheable:
      return
    end = min(full_pages, len(hashes), len(lease.pages))
    for j in range(lease.registered, end):
      key, page = (lease.upstream, hashes[j]), lease.pages[j]
      if key not in self._page_of and page not in self._key_of:
        self._page_of[key] = page
        self._key_of[page] = key
        self.counters.registered_pages += 1
        lease.read_only.add(j)  # others may read it from now on
    lease.registered = max(lease.registered, end)

  def leading_read_only(self, lease: Lease) -> int:
    """Logical pages [0, n) of the lease whose KV is registered (valid without recomputing)."""
    n = 0
    while n in lease.read_only:
      n += 1
    return n

  def stop_caching(self, lease: Lease) -> bool:
    """The lease's KV will be recomputed under another upstream (a reroute): its read-only pages
    become private fresh ones and nothing more is registered. False (nothing changed) when the
    pool has no room for the swap."""
    shared = sorted(lease.read_only)
    if len(shared) > len(self._free) + len(self._evictable):
      return False
    for j in shared:
      self._unref(lease.pages[j])
      lease.pages[j] = self._take()
      lease.read_only.discard(j)
    lease.upstream = None
    return True

  def drop_cache(self) -> None:
    """The pool's KV was lost (its instance re-hosted empty): forget every registered page, and
    let every lease write its pages again (their replays rebuild them)."""
    for page in list(self._evictable):
      self._free.append(page)
    self._evictable.clear()
    self._key_of.clear()
    self._page_of.clear()
    for lease in self._leases.values():
      lease.read_only.clear()
      lease.registered = 0

  def cache_stats(self) -> dict[str, int]:
    c = self.counters
    return {"prefix_queried_pages": c.queried_pages, "prefix_hit_pages": c.hit_pages,
            "prefix_registered_pages": c.registered_pages, "prefix_evicted_pages": c.evicted_pages,
            "prefix_cached_pages": self.cached_pages,
            "prefix_evictable_pages": len(self._evictable)}

  # ---- page refcounts ---------------------------------------------------------------------------

  def _take(self) -> int:
    """A page for a new hold: a free one, else the least recently used cached one (evicted)."""
    if self._free:
      page = self._free.pop()
    else:
      page, _ = self._evictable.popitem(last=False)
      del self._page_of[self._key_of.pop(page)]
      self.counters.evicted_pages += 1
    self._refs[page] = 1
    return page

  def _ref(self, page: int) -> None:
    if self._refs[page] == 0:
      self._evictable.pop(page, None)
    self._refs[page] += 1

  def _unref(self, page: int) -> None:
    self._refs[page] -= 1
    if self._refs[page] == 0:
      if page in self._key_of:
        self._evictable[page] = None
      else:
        self._free.append(page)

  def refcount(self, page: int) -> int:
    return self._refs[page]
