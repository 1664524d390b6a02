"""The KV manager alone: refcounted pages, the prefix cache's keys, adoption, LRU eviction."""

import types

import pytest

from jblock.errors import OverloadedError
from jblock.runtime import prefix
from jblock.runtime.kv import PagePool, read_only, token_hashes

PS = 4
UP = b"upstream"


def _filled(pool, tokens, owner="a", new=0):
  """A lease of len(tokens) + new tokens whose full prompt pages are committed."""
  hashes = token_hashes(tokens, PS, [])
  lease = pool.lease(owner, len(tokens) + new, UP, hashes)
  pool.commit(lease, hashes, len(tokens) // PS)
  return lease, hashes


def test_token_hashes_chain_every_page_and_extend_incrementally():
  a = token_hashes(list(range(12)), PS, [])
  b = token_hashes(list(range(8)) + [99, 9, 10, 11], PS, [])
  assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
  c = token_hashes([50] + list(range(1, 12)), PS, [])
  assert all(x != y for x, y in zip(a, c))  # a changed first page changes every later key
  known = token_hashes(list(range(8)), PS, [])
  assert token_hashes(list(range(12)), PS, known) == a and known is not a


def test_adopted_pages_are_shared_refcounted_and_read_only_in_the_table():
  pool = PagePool(16, PS, 4)
  first, hashes = _filled(pool, list(range(10)), "a", new=2)  # 3 pages, 2 full
  assert pool.cached_pages == 2 and pool.used_pages == 3
  second = pool.lease("b", 12, UP, hashes)
  assert pool.leading_read_only(second) == 2
  assert second.pages[:2] == first.pages[:2] and second.pages[2] != first.pages[2]
  assert [pool.refcount(p) for p in first.pages] == [2, 2, 1]
  assert pool.used_pages == 4  # 3 + the one page it computes itself
  table = pool.table(second, 4)
  assert table[:2] == [read_only(p) for p in first.pages[:2]] and table[2] == second.pages[2]
  # Another upstream (another chain below this block) finds nothing.
  other = pool.lease("c", 8, b"other", hashes)
  assert not other.read_only and pool.counters.hit_pages == 2


def test_release_keeps_registered_pages_cached_and_eviction_is_lru_tail_first():
  pool = PagePool(6, PS, 4)
  lease, hashes = _filled(pool, list(range(12)))  # 3 full pages, all registered
  pages = list(lease.pages)
  lease.release()
  assert pool.free_pages == 6 and pool.cached_pages == 3 and pool.leases == 0
  # 3 fresh pages fit without evicting; the 4th evicts the prefix's tail page first.
  fresh = pool.lease("b", 12)
  assert not set(fresh.pages) & set(pages) and pool.cached_pages == 3
  more = pool.lease("c", 4)
  assert more.pages == [pages[2]] and pool.cached_pages == 2
  assert pool.counters.evicted_pages == 1
  # The head of the prefix is still cached: a lease adopts it before taking fresh pages.
  again = pool.lease("d", 8, UP, hashes)
  assert again.pages == pages[:2] and again.read_only == {0, 1}
  assert pool.counters.evicted_pages == 1
  fresh.release(), more.release(), again.release()
  evict = pool.lease("e", 24)  # every page: the cached ones are evicted, the head last
  assert evict.pages[-2:] == [pages[1], pages[0]] and pool.cached_pages == 0


def test_eviction_never_touches_a_page_in_use():
  pool = PagePool(4, PS, 4)
  held, _ = _filled(pool, list(range(8)))  # 2 registered pages, held
  assert pool.free_pages == 2
  with pytest.raises(OverloadedError):
    pool.lease("b", 12)  # 3 pages: only 2 free, the held ones are never evicted
  assert pool.cached_pages == 2 and all(pool.refcount(p) == 1 for p in held.pages)


def test_a_key_computed_twice_stays_registered_once():
  pool = PagePool(16, PS, 4)
  tokens = list(range(8))
  hashes = token_hashes(tokens, PS, [])
  a, b = pool.lease("a", 8, UP, hashes), pool.lease("b", 8, UP, hashes)  # both compute it
  pool.commit(a, hashes, 2)
  pool.commit(b, hashes, 2)
  assert pool.cached_pages == 2 and not b.read_only and a.read_only == {0, 1}
  b.release()
  assert pool.free_pages == 14  # b's duplicate pages are plain free pages


def test_drop_cache_forgets_everything_and_lets_leases_write_again():
  pool = PagePool(8, PS, 4)
  lease, hashes = _filled(pool, list(range(8)))
  other = pool.lease("b", 8, UP, hashes)
  pool.drop_cache()
  assert pool.cached_pages == 0 and not lease.read_only and not other.read_only
  assert pool.table(other, 2) == other.pages
  lease.release(), other.release()
  assert pool.free_pages == 8 and all(pool.refcount(p) == 0 for p in range(8))


def test_stop_caching_makes_shared_pages_private():
  pool = PagePool(8, PS, 4)
  first, hashes = _filled(pool, list(range(8)))
  second = pool.lease("b", 8, UP, hashes)
  assert second.read_only == {0, 1}
  assert pool.stop_caching(second)
  assert not set(second.pages) & set(first.pages) and not second.read_only
  assert second.upstream is None
  pool.commit(second, hashes, 2)  # nothing more registered from it
  assert pool.cached_pages == 2


def test_windowed_pools_do_not_cache():
  pool = PagePool(8, PS, 4)
  pool.window = 4
  lease, hashes = _filled(pool, list(range(8)))
  assert pool.cached_pages == 0 and not lease.read_only


def _inst(block_id, kind="layers", rope=None):
  return types.SimpleNamespace(block_id=block_id, kind=kind, config={"rope": rope},
                               pool=PagePool(8, PS, 2) if kind == "layers" else None)


def test_upstream_keys_share_a_block_only_with_everything_below_it():
  embed, l0, l1a, l1b, top = (_inst("e", "embed"), _inst("l0"), _inst("l1a"), _inst("l1b"),
                              _inst("top"))

  def keys(chain, salt=""):
    req = types.SimpleNamespace(kv_salt=salt, segments=[types.SimpleNamespace(instances=chain)])
    return prefix.upstream_keys(req)[0]

  a, b = keys([embed, l0, l1a, top]), keys([embed, l0, l1b, top])
  assert a[0] == b[0]  # the shared bottom block: the same KV for the same tokens
  assert a[1] != b[1] and a[2] != b[2]  # a shared block above a private one: not the same KV
  assert keys([embed, l0, l1a, top], salt="delta-1")[0] != a[0]  # an adapter changes every KV
  longrope = _inst("lr", rope={"rope_type": "longrope"})
  assert keys([embed, longrope])[0] is None  # its KV depends on the sequence's length
