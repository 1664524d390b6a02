"""What the engine shows of itself: the trace of recent batches and the stats dict."""

import collections
from typing import Any, Callable

from jblock.runtime import parts as parts_lib
from jblock.runtime import replicas as replicas_lib

from jblock.runtime.step import BlockBatch

_FIELDS = ("batch", "kind", "blocks", "items", "padded_batch", "length", "models",
           "dispatched", "done")


class Trace:
  """The latest batches: which segment ran with which requests, dispatched and done times
  (time.perf_counter); two batches overlap when one was dispatched before the other was done.
  Guarded by the engine's lock."""

  def __init__(self, size: int):
    self._rows: collections.deque = collections.deque(maxlen=size)
    self._dispatched: dict[int, float] = {}

  @property
  def pending(self) -> int:
    """Batches dispatched and not yet back."""
    return len(self._dispatched)

  def dispatched(self, batch: BlockBatch, at: float) -> None:
    self._dispatched[batch.seq] = at

  def done(self, batch: BlockBatch, at: float) -> None:
    seg = batch.segment
    self._rows.append((batch.seq, "+".join(i.kind for i in seg.instances),
                       tuple(i.block_id[:12] for i in seg.instances), len(batch.items),
                       batch.b_pad, batch.t_pad, tuple(sorted({it.req.model for it in batch.items})),
                       self._dispatched.pop(batch.seq, at), at))

  def rows(self) -> list[dict[str, Any]]:
    return [dict(zip(_FIELDS, t)) for t in self._rows]


def trace_text(rows: list[dict[str, Any]]) -> str:
  """Plain-text view of batches (Trace.rows): which block ran with which requests."""
  lines = [f"{'batch':>6} {'kind':<20} {'block':<16} {'items':>5}/{'pad':<3} {'len':>4} {'ms':>7}  models"]
  for t in rows:
    blocks = t["blocks"][0] + (f"+{len(t['blocks']) - 1}" if len(t["blocks"]) > 1 else "")
    kind = t["kind"] if len(t["kind"]) <= 20 else t["kind"][:17] + "..."
    lines.append(f"{t['batch']:>6} {kind:<20} {blocks:<16} {t['items']:>5}/{t['padded_batch']:<3} "
                 f"{t['length']:>4} {1e3 * (t['done'] - t['dispatched']):7.1f}  "
                 f"{','.join(t['models'])}")
  return "\n".join(lines)


def prefix_stats(scheduler, instances) -> dict[str, Any]:
  """Request-level prefix-cache figures, the pages every KV pool holds for it, and the tokens
  each instance computed ({"prompt", "decode"})."""
  pages = collections.Counter()
  for inst in instances:
    if inst.pool is not None:
      pages.update(inst.pool.cache_stats())
  computed: dict[str, dict[str, int]] = {}
  for (key, phase), n in scheduler.computed.items():
    computed.setdefault(key, {"prompt": 0, "decode": 0})[phase] = n
  return {**scheduler.prefix_cache.stats(), **pages, "enabled": scheduler.config.prefix_caching,
          "computed_tokens": computed}


def engine_stats(sharing: bool, mesh, registry, scheduler, adapters, rerouter, replicas,
                 recoveries, cluster_stats: Callable[[], Any] | None) -> dict[str, Any]:
  """Engine.stats(): blocks, bytes, requests, models and segments, adapters, prefix cache,
  rerouting, workers, recoveries and replicas (under the engine's lock)."""
  instances = registry.instances
  blocks = [inst.stats() for inst in instances.values()]
  return {
      "sharing": sharing,
      "mesh": dict(mesh.shape),
      "blocks": blocks,
      "resident_bytes": parts_lib.resident_bytes(instances.values()),
      "kv_bytes": sum(b["kv_bytes"] for b in blocks),
      "queue_depth": scheduler.num_waiting,
      "requests": {"waiting": scheduler.num_waiting, "active": len(scheduler.active),
                   "finished": dict(scheduler.finished)},
      "models": {name: [inst.key for inst in chain] for name, (_, chain) in registry.models.items()},
      "segments": {name: [list(s.key) for s in segs] for name, segs in registry.segments.items()},
      "adapters": adapters.stats(),
      "prefix_cache": prefix_stats(scheduler, instances.values()),
      "reroute": rerouter.stats(),
      "workers": cluster_stats() if cluster_stats else [],
      "recoveries": [dict(e) for e in recoveries],
      "replicas": replicas_lib.stats(instances, replicas, rerouter.through()),
  }
