"""Prometheus metrics of the serving layer, on their own registry and HTTP port.

Latencies come from the request handles' engine-side timestamps; engine gauges (queue
depth, per-block occupancy and KV slots) are read from engine.stats() at scrape time, so
they are never stale and need no refresher thread.

Per-tenant series (`jblock_tenant_*`) name tenants, so a scrape gets them only with the admin
key (`Authorization: Bearer KEY`); other scrapes get every other series. A metrics port with no
admin key to check (no tenants file) listens on 127.0.0.1 only.
"""

import logging
import socket
import socketserver
import ssl
import threading
from wsgiref import simple_server

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jblock.cluster.security import LOOPBACK, is_loopback
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


def bearer_key(authorization: str | None) -> str | None:
  """KEY of an 'Authorization: Bearer KEY' header."""
  scheme, _, token = (authorization or "").partition(" ")
  return token.strip() if scheme.lower() == "bearer" else None


class _ThreadingServer(socketserver.ThreadingMixIn, simple_server.WSGIServer):
  daemon_threads = True


class _QuietHandler(simple_server.WSGIRequestHandler):
  def log_message(self, *args):  # no line per scrape
    pass


class ServingMetrics:
  """Request latencies and outcomes, plus the engine's gauges when an engine is given.

  `registry` holds every series; `public_registry` the same ones less the per-tenant series."""

  def __init__(self, engine: Engine | None = None):
    self.registry = CollectorRegistry()
    self.public_registry = CollectorRegistry()
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
    for shared in (self.ttft, self.tpot, self.latency, self.requests):
      self.public_registry.register(shared)
    if engine is not None:
      stats = _EngineStatsCollector(engine)
      self.registry.register(stats)
      self.public_registry.register(stats)
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

  def render(self, include_tenants: bool = True) -> bytes:
    """The exposition text a scrape returns; per-tenant series only with `include_tenants`."""
    return generate_latest(self.registry if include_tenants else self.public_registry)

  def start_http(self, port: int, host: str = "127.0.0.1",
                 tls_files: tuple[str, str] | None = None, is_admin=None) -> int:
    """Serves /metrics on `port` (0 = off) — over HTTPS with `tls_files` (certificate and key
    PEM paths, the client-facing ports' --tls_cert/--tls_key); returns the port, or 0 when off.

    `is_admin(key or None) -> bool` tells the admin key: a scrape bearing it gets the per-tenant
    series. Without `is_admin` there is no key to check, every scrape gets every series, and
    the port listens on 127.0.0.1 only, whatever `host` says."""
    if not port:
      return 0
    if is_admin is None and not is_loopback(host):
      logging.warning("jblock: the metrics port has no admin key to check (no --tenants): "
                      "listening on %s only, not %s", LOOPBACK, host)
      host = LOOPBACK
    full, public = make_wsgi_app(self.registry), make_wsgi_app(self.public_registry)

    def app(environ, start_response):
      admin = is_admin is None or is_admin(bearer_key(environ.get("HTTP_AUTHORIZATION")))
      return (full if admin else public)(environ, start_response)

    server_class = type("_Server", (_ThreadingServer,), {})
    if ":" in host:
      server_class.address_family = socket.AF_INET6
    httpd = simple_server.make_server(host.strip("[]"), port, app, server_class, _QuietHandler)
    if tls_files:
      context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
      context.load_cert_chain(*tls_files)
      httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, name="jblock-metrics", daemon=True).start()
    self._http = httpd
    return httpd.server_port

  def stop_http(self) -> None:
    if self._http is not None:
      self._http.shutdown()
      self._http.server_close()
      self._http = None
