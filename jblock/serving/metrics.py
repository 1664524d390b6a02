"""Prometheus metrics of the serving layer, on their own registry and HTTP port.

Latencies come from the request handles' engine-side timestamps; engine gauges (queue
depth, per-block occupancy and KV slots) are read from engine.stats() at scrape time, so
they are never stale and need no refresher thread.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jblock.runtime.engine_api import Engine, RequestHandle

# Decode steps run from about a millisecond (GPU) to a second (big model on CPU).
_LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 30.0, 60.0)


class _EngineStatsCollector(Collector):
  """Gauges read from engine.stats() on every scrape."""

  def __init__(self, engine: Engine):
    self._engine = engine

  def collect(self):
    stats = self._engine.stats()
    queue = GaugeMetricFamily("jblock_queue_depth", "Requests waiting for admission.")
    queue.add_metric([], stats.get("queue_depth", 0))
    yield queue
    labels = ["block_id", "kind"]
    occupancy = GaugeMetricFamily(
        "jblock_block_batch_occupancy", "Mean rows / batch size over the batches a block ran.",
        labels=labels)
    used = GaugeMetricFamily("jblock_block_kv_slots_used", "KV slots in use per block.",
                             labels=labels)
    free = GaugeMetricFamily("jblock_block_kv_slots_free", "Free KV slots per block.",
                             labels=labels)
    resident = GaugeMetricFamily("jblock_block_resident_bytes", "Weight bytes a block holds.",
                                 labels=labels)
    for block in stats.get("blocks", []):
      key = [str(block.get("block_id", "")), str(block.get("kind", ""))]
      occupancy.add_metric(key, block.get("mean_occupancy", 0.0))
      used.add_metric(key, block.get("kv_slots_used", 0))
      free.add_metric(key, block.get("kv_slots_free", 0))
      resident.add_metric(key, block.get("resident_bytes", 0))
    yield from (occupancy, used, free, resident)
    yield from _counters(_REROUTE, stats.get("reroute") or {})
    yield from _counters(_ADAPTERS, stats.get("adapters") or {})
    yield from _counters(_PREFIX, stats.get("prefix_cache") or {})


# engine.stats()["reroute"] key -> (metric name without _total, help)
_REROUTE = {
    "moves": ("jblock_reroute_moves", "Chain positions moved onto another equivalent block or back."),
    "routed_back": ("jblock_reroute_routed_back", "Moves back onto the model's own block."),
    "kv_reused": ("jblock_reroute_kv_reused", "Moves whose KV pages were copied (interchangeable blocks)."),
    "kv_recomputed": ("jblock_reroute_kv_recomputed", "Moves whose KV was recomputed by a replay."),
    "steps_rerouted": ("jblock_reroute_steps", "Request steps run on a rerouted chain."),
}
# engine.stats()["prefix_cache"] key -> (metric name without _total, help)
_PREFIX = {
    "prompt_tokens": ("jblock_prefix_cache_queries",
                      "Prompt tokens looked up in the prefix cache (every admitted request's)."),
    "hit_tokens": ("jblock_prefix_cache_hits", "Prompt tokens whose KV was found cached (not computed)."),
    "replay_reused_tokens": ("jblock_prefix_cache_replay_reused",
                             "Tokens KV replays skipped because their pages were still cached."),
    "prefix_evicted_pages": ("jblock_prefix_cache_evicted_pages",
                             "Cached KV pages evicted to make room (every block)."),
}
# engine.stats()["adapters"] key -> (metric name, help); counters end in _total, swap time in seconds
_ADAPTERS = {
    "hits": ("jblock_lora_bank_hits", "Requests whose adapter was already in a bank slot."),
    "misses": ("jblock_lora_bank_misses", "Requests whose adapter had to be swapped into a slot."),
    "evictions": ("jblock_lora_bank_evictions", "Adapters evicted from a bank slot (LRU)."),
    "swap_s": ("jblock_lora_swap_seconds", "Time spent installing adapters into bank slots."),
}


def _counters(table: dict, section: dict):
  """One counter per `table` entry, read from that key of an engine.stats() section."""
  for key, (name, doc) in table.items():
    metric = CounterMetricFamily(name, doc)
    metric.add_metric([], section.get(key, 0))
    yield metric


class ServingMetrics:
  """Request latencies and outcomes, plus the engine's gauges when an engine is given."""

  def __init__(self, engine: Engine | None = None):
    self.registry = CollectorRegistry()
    self.ttft = Histogram("jblock_ttft_seconds", "Time to first token (submit to first token).",
                          buckets=_LATENCY_BUCKETS, registry=self.registry)
    self.tpot = Histogram(
        "jblock_tpot_seconds", "Time per output token after the first: "
        "(latency - TTFT) / (output tokens - 1).", buckets=_LATENCY_BUCKETS,
        registry=self.registry)
    self.latency = Histogram("jblock_request_latency_seconds", "Submit to last token.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
    self.requests = Counter("jblock_requests", "Generate requests by final gRPC status.",
                            labelnames=["status"], registry=self.registry)
    # Per tenant (both protocols): outcomes and tokens.
    self.tenant_requests = Counter(
        "jblock_tenant_requests", "Generations by tenant and final status (gRPC status name).",
        labelnames=["tenant", "status"], registry=self.registry)
    self.tenant_tokens = Counter(
        "jblock_tenant_tokens", "Prompt and completion tokens by tenant.",
        labelnames=["tenant", "kind"], registry=self.registry)
    self.tenant_ttft = Histogram("jblock_tenant_ttft_seconds", "Time to first token by tenant.",
                                 labelnames=["tenant"], buckets=_LATENCY_BUCKETS,
                                 registry=self.registry)
    if engine is not None:
      self.registry.register(_EngineStatsCollector(engine))
    self._http = None

  def observe(self, status: str, handle: RequestHandle | None = None) -> None:
    """Records one finished Generate RPC; latencies only for requests that completed."""
    self.requests.labels(status=status).inc()
    if status != "OK" or handle is None or handle.first_token_at is None:
      return
    ttft = handle.first_token_at - handle.submitted_at
    latency = handle.finished_at - handle.submitted_at
    self.ttft.observe(ttft)
    self.latency.observe(latency)
    output_tokens = len(handle.tokens)
    if output_tokens > 1:
      self.tpot.observe((latency - ttft) / (output_tokens - 1))

  def observe_tenant(self, tenant: str, status: str, generation=None) -> None:
    """Records one generation of `tenant` (a generation.Generation, or None if refused)."""
    self.tenant_requests.labels(tenant=tenant, status=status).inc()
    if generation is None:
      return
    usage = generation.usage
    self.tenant_tokens.labels(tenant=tenant, kind="prompt").inc(usage.prompt_tokens)
    self.tenant_tokens.labels(tenant=tenant, kind="completion").inc(usage.completion_tokens)
    handle = generation.handle
    if handle.first_token_at is not None:
      self.tenant_ttft.labels(tenant=tenant).observe(handle.first_token_at - handle.submitted_at)

  def render(self) -> bytes:
    """The exposition text a scrape returns."""
    return generate_latest(self.registry)

  def start_http(self, port: int, host: str = "127.0.0.1",
                 tls_files: tuple[str, str] | None = None) -> int:
    """Serves /metrics on `port` (0 = off) — over HTTPS with `tls_files` (certificate and key
    PEM paths, the client-facing ports' --tls_cert/--tls_key); returns the port, or 0 when off."""
    if not port:
      return 0
    certfile, keyfile = tls_files or (None, None)
    self._http, _ = start_http_server(port, addr=host, registry=self.registry,
                                      certfile=certfile, keyfile=keyfile)
    return self._http.server_port

  def stop_http(self) -> None:
    if self._http is not None:
      self._http.shutdown()
      self._http.server_close()
      self._http = None
