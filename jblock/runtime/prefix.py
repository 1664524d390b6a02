"""Prefix caching over a request's leases: which cached pages it adopts, which it registers.

The scheduler's helpers (only the scheduler calls them; they change the request's leases).
A lease's pages are keyed by the chain *upstream* of its instance: every block id from the
embedding up to and including the instance (with the request's substitutions and replicas
resolved to block ids) and the request's `kv_salt` (an adapter's deltas change every KV after
them). Models that share an instance and every block below it therefore share its cached
prefixes; a shared block above a private one does not (its input differs).
"""

import collections
import hashlib
import time

from jblock.blocks import LAYERS
from jblock.models import rope as rope_lib
from jblock.runtime.kv import token_hashes


def cacheable(inst) -> bool:
  """Whether an instance's KV for a position depends only on the tokens up to it. Not so where
  the RoPE frequencies follow the whole sequence's length (dynamic NTK, LongRoPE)."""
  return inst.pool is not None and inst.pool.cacheable and not rope_lib.depends_on_length(
      (inst.config or {}).get("rope"))


def upstream_keys(req) -> list[list[bytes | None]]:
  """Per segment, per layers instance: its upstream key (None: not cacheable)."""
  h = hashlib.blake2b(req.kv_salt.encode(), digest_size=16)
  out = []
  for seg in req.segments:
    row = []
    for inst in seg.instances:
      h.update(inst.block_id.encode() + b"/")
      if inst.kind == LAYERS:
        row.append(h.copy().digest() if cacheable(inst) else None)
    out.append(row)
  return out


def lease_all(req, page_size: int, chunk: int, caching: bool) -> None:
  """Leases KV for a just admitted request in every layers instance of its chain; with
  `caching`, each lease adopts its instance's cached pages of the prompt's longest prefix."""
  hashes = token_hashes(req.prompt, page_size, req.token_hashes) if caching else []
  keys = upstream_keys(req) if caching else [[None] * len(s.layers) for s in req.segments]
  rid = req.handle.request_id
  for seg, seg_keys in zip(req.segments, keys):
    tables = []
    for inst, key in zip(seg.layers, seg_keys):
      lease = inst.pool.lease(rid, inst.pool.lease_tokens(req.tokens_needed, chunk), key, hashes)
      req.leases.setdefault(inst.key, []).append(lease)
      tables.append(lease)
    req.tables.append(tables)


def commit(req, page_size: int) -> None:
  """Registers the full pages of the request's KV written in every pool so far."""
  full = req.cached // page_size
  if full == req.committed_pages:
    return  # no page boundary crossed since the last commit (most decode steps)
  req.committed_pages = full
  hashes = token_hashes((req.prompt + req.generated)[:full * page_size], page_size,
                        req.token_hashes)
  for leases in req.tables:
    for lease in leases:
      lease.pool.commit(lease, hashes, full)


def reusable(req, page_size: int) -> int:
  """Tokens at the start of the request's sequence whose KV every lease holds registered
  (valid whatever happened to the request since): where its prompt or a replay may start."""
  pages = [lease.pool.leading_read_only(lease) for leases in req.tables for lease in leases]
  return min(pages) * page_size if pages else 0


def detach(req, leases, recompute: bool) -> bool:
  """The request's KV in `leases` (instances at or above a position its route changes) will
  no longer be what their upstream key says: nothing more is registered from them, and with
  `recompute` their read-only pages become private (the replay writes them). False when a pool
  has no room for that swap (nothing changed then)."""
  if recompute:
    need = {}
    for lease in leases:
      need[id(lease.pool)] = need.get(id(lease.pool), 0) + len(lease.read_only)
    if any(lease.pool.free_pages < need[id(lease.pool)] for lease in leases):
      return False
    for lease in leases:
      lease.pool.stop_caching(lease)
  else:
    for lease in leases:
      lease.upstream = None  # its pages keep the KV the request reuses, registered as they were
  return True


def computed_elsewhere(req, active, page_size: int, max_wait_s: float) -> bool:
  """Whether a running request of the same model (same KV keys) is still computing pages of
  `req`'s prompt prefix that are not cached yet: a burst of requests behind one system prompt
  computes it once, the rest wait for it instead of computing it beside it. Only behind a
  request on the model's own chain with every instance resident (its pages are the ones `req`
  would find), and for at most `max_wait_s` after `req` arrived."""
  if time.monotonic() - req.handle.submitted_at > max_wait_s:
    return False
  mine = token_hashes(req.prompt, page_size, req.token_hashes)
  for other in active:
    if (other.generated or other.model != req.model or other.kv_salt != req.kv_salt
        or not other.token_hashes or not mine or other.token_hashes[0] != mine[0]
        or other.route or other.replicas or other.segments is not req.segments
        or not all(i.available for s in other.segments for i in s.instances)):
      continue
    common = 0
    for a, b in zip(mine, other.token_hashes):
      if a != b:
        break
      common += 1
    if other.cached // page_size < min(common, (len(req.prompt) - 1) // page_size):
      return True
  return False


class PrefixCaching:
  """The scheduler's prefix-cache policy over its requests' leases: what a request adopts at
  admission, what it registers as its KV is written, where a replay starts, whether a request
  waits for a prefix another computes, and the counters. Disabled: leases adopt nothing and
  nothing is registered (the counters still count prompts)."""

  def __init__(self, enabled: bool, page_size: int, max_wait_s: float):
    self.enabled = enabled
    self.page_size = page_size
    self.max_wait_s = max_wait_s
    self.counts = collections.Counter()

  def lease_all(self, req, chunk: int) -> None:
    lease_all(req, self.page_size, chunk, self.enabled)

  def waits(self, req, active) -> bool:
    return self.enabled and computed_elsewhere(req, active, self.page_size, self.max_wait_s)

  def start_of(self, req) -> int:
    """Where a just admitted request starts computing: after the prefix every lease of its (now
    bound) chain found cached; its last prompt token is always computed, for its logits."""
    self.counts["requests"] += 1
    self.counts["prompt_tokens"] += len(req.prompt)
    if not self.enabled or req.params.prompt_logprobs is not None:
      return 0  # prompt logprobs need the logits of every position: computed, never adopted
    ps = self.page_size
    hit = min(reusable(req, ps), (len(req.prompt) - 1) // ps * ps)
    self.counts["hit_tokens"] += hit
    self.counts["requests_hit"] += hit > 0
    return hit

  def commit(self, req) -> None:
    if self.enabled:
      commit(req, self.page_size)

  def replay_start(self, req, target: int) -> int:
    """Where a replay towards `target` tokens starts (a page boundary below it)."""
    start = reusable(req, self.page_size) if self.enabled else 0
    start = min(start, (target - 1) // self.page_size * self.page_size)
    self.counts["replay_reused_tokens"] += start
    return start

  def detach(self, req, from_position: int, recompute: bool) -> bool:
    leases, pos = [], 0
    for seg, tables in zip(req.segments, req.tables):
      layers = iter(tables)
      for inst in seg.instances:
        lease = next(layers) if inst.kind == LAYERS else None
        if lease is not None and pos >= from_position:
          leases.append(lease)
        pos += 1
    return detach(req, leases, recompute)

  def stats(self) -> dict:
    c = self.counts
    rate = round(c["hit_tokens"] / c["prompt_tokens"], 4) if c["prompt_tokens"] else 0.0
    return {k: c[k] for k in ("requests", "requests_hit", "prompt_tokens", "hit_tokens",
                              "replay_reused_tokens")} | {"hit_rate": rate}
