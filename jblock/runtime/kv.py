"""KV page pools: each layers instance owns a pool of fixed-size pages and leases them out.

A request holds one lease in every layers instance of its chain (keyed by instance, not by
chain position). A lease reserves the pages the request can ever need (prompt + max new
tokens), so a running request never runs out of KV and nothing needs preempting; memory
follows each request's real length instead of the engine's `max_seq_len`.
"""

import dataclasses

from jblock.errors import OverloadedError


def pages_for(tokens: int, page_size: int) -> int:
  return -(-tokens // page_size)


@dataclasses.dataclass(eq=False)
class Lease:
  pool: "PagePool"
  owner: str  # request id
  pages: list[int]  # logical page i of the request -> physical page

  def release(self) -> None:
    self.pool.release(self)


class PagePool:
  """Free list of `num_pages` pages of `page_size` tokens, at most `max_leases` leases at once."""

  def __init__(self, num_pages: int, page_size: int, max_leases: int):
    self.num_pages = num_pages
    self.page_size = page_size
    self.max_leases = max_leases
    self._free = list(range(num_pages - 1, -1, -1))
    self._leases: dict[int, Lease] = {}
    self.window = 0  # > 0: every layer attends at most this far back (see lease_tokens)

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
    return len(self._free)

  @property
  def leases(self) -> int:
    return len(self._leases)

  def table(self, lease: "Lease", width: int) -> list[int]:
    """The lease's first `width` logical pages (ring-mapped under a window)."""
    pages = lease.pages
    if len(pages) >= width:
      return pages[:width]
    return [pages[j % len(pages)] for j in range(width)] if self.window else pages

  def can_lease(self, tokens: int, count: int = 1) -> bool:
    return (self.leases + count <= self.max_leases
            and self.free_pages >= count * pages_for(tokens, self.page_size))

  def lease(self, owner: str, tokens: int) -> Lease:
    need = pages_for(tokens, self.page_size)
    if self.leases >= self.max_leases or need > len(self._free):
      raise OverloadedError(f"no KV room for {tokens} tokens ({need} pages; "
                            f"{len(self._free)} free, {self.leases}/{self.max_leases} leases)")
    lease = Lease(self, owner, [self._free.pop() for _ in range(need)])
    self._leases[id(lease)] = lease
    return lease

  def release(self, lease: Lease) -> None:
    if self._leases.pop(id(lease), None) is not None:
      self._free.extend(reversed(lease.pages))
      lease.pages = []
