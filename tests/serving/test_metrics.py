"""Prometheus metrics: latency histograms, request statuses, engine gauges over HTTP."""

import urllib.request

import grpc
import pytest

from jblock.runtime import engine_api
from jblock.runtime.engine_api import RequestHandle
from jblock.serving.metrics import ServingMetrics
from tests.serving.serving_helpers import free_port


def _sample(text: str, name: str) -> float:
  """The value of the exposition line that starts with `name ` (labels included)."""
  for line in text.splitlines():
    if line.startswith(name + " "):
      return float(line.split()[-1])
  raise AssertionError(f"{name} not exposed:\n{text}")


def test_tpot_excludes_the_first_token():
  metrics = ServingMetrics()
  handle = RequestHandle("r", "m", prompt_len=2)
  for token in range(11):
    handle._emit(token)
  handle._finish(engine_api.LENGTH)
  handle.submitted_at, handle.first_token_at, handle.finished_at = 10.0, 10.5, 12.5
  metrics.observe("OK", handle)
  text = metrics.render().decode()
  assert _sample(text, "jblock_ttft_seconds_sum") == pytest.approx(0.5)
  assert _sample(text, "jblock_tpot_seconds_sum") == pytest.approx(0.2)  # 2 s / 10 tokens
  assert _sample(text, "jblock_request_latency_seconds_sum") == pytest.approx(2.5)
  assert _sample(text, 'jblock_ttft_seconds_bucket{le="0.5"}') == 1
  assert _sample(text, 'jblock_ttft_seconds_bucket{le="0.25"}') == 0
  # One token: a TTFT but no TPOT; failures: a status but no latency.
  single = RequestHandle("s", "m", prompt_len=1)
  single._emit(1)
  single._finish(engine_api.STOP)
  metrics.observe("OK", single)
  metrics.observe("INVALID_ARGUMENT")
  text = metrics.render().decode()
  assert _sample(text, "jblock_ttft_seconds_count") == 2
  assert _sample(text, "jblock_tpot_seconds_count") == 1
  assert _sample(text, 'jblock_requests_total{status="OK"}') == 2
  assert _sample(text, 'jblock_requests_total{status="INVALID_ARGUMENT"}') == 1


def test_metrics_endpoint_exposes_histograms_statuses_and_block_gauges(serve, engine):
  metrics = ServingMetrics(engine)
  assert metrics.start_http(0) == 0  # 0 = off
  port = metrics.start_http(free_port())
  try:
    client, _, _ = serve(engine, metrics=metrics)
    for prompt in ([1, 2], [3]):
      client.generate_tokens("mock-a", prompt_tokens=prompt, max_tokens=6, timeout=10)
    with pytest.raises(grpc.RpcError):
      list(client.generate("nope", prompt_tokens=[1], timeout=10))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
      text = response.read().decode()
  finally:
    metrics.stop_http()
  assert _sample(text, "jblock_ttft_seconds_count") == 2
  assert _sample(text, "jblock_tpot_seconds_count") == 2
  assert _sample(text, 'jblock_tpot_seconds_bucket{le="+Inf"}') == 2
  assert _sample(text, 'jblock_requests_total{status="OK"}') == 2
  assert _sample(text, 'jblock_requests_total{status="NOT_FOUND"}') == 1
  assert _sample(text, "jblock_queue_depth") == 0
  embed = '{block_id="mock-embed",kind="embed"}'
  shared = '{block_id="mock-layers-0",kind="layers"}'  # KV lives in the layers blocks
  assert _sample(text, f"jblock_block_kv_slots_used{shared}") == 0
  assert _sample(text, f"jblock_block_kv_slots_free{shared}") == 16
  assert _sample(text, f"jblock_block_kv_slots_free{embed}") == 0
  assert _sample(text, f"jblock_block_resident_bytes{embed}") == 1 << 20
  # 2 requests x 6 steps, one row in a batch of 8 each time.
  assert _sample(text, f"jblock_block_batch_occupancy{embed}") == pytest.approx(1 / 8)


def test_reroute_adapter_bank_and_prefix_cache_counters_come_from_engine_stats():
  class _Stats:  # the stats sections the counters read (as Engine.stats() gives them)
    def stats(self):
      return {"reroute": {"models": ["ft"], "moves": 7, "routed_back": 3, "kv_reused": 2,
                          "kv_recomputed": 4, "steps_rerouted": 41},
              "adapters": {"hits": 11, "misses": 5, "evictions": 2, "swap_s": 0.25},
              "prefix_cache": {"prompt_tokens": 900, "hit_tokens": 640, "replay_reused_tokens": 32,
                               "prefix_evicted_pages": 3, "hit_rate": 0.71}}

  text = ServingMetrics(_Stats()).render().decode()
  assert _sample(text, "jblock_reroute_moves_total") == 7
  assert _sample(text, "jblock_reroute_routed_back_total") == 3
  assert _sample(text, "jblock_reroute_kv_reused_total") == 2
  assert _sample(text, "jblock_reroute_kv_recomputed_total") == 4
  assert _sample(text, "jblock_reroute_steps_total") == 41
  assert _sample(text, "jblock_lora_bank_hits_total") == 11
  assert _sample(text, "jblock_lora_bank_misses_total") == 5
  assert _sample(text, "jblock_lora_bank_evictions_total") == 2
  assert _sample(text, "jblock_lora_swap_seconds_total") == 0.25
  assert _sample(text, "jblock_prefix_cache_queries_total") == 900
  assert _sample(text, "jblock_prefix_cache_hits_total") == 640
  assert _sample(text, "jblock_prefix_cache_replay_reused_total") == 32
  assert _sample(text, "jblock_prefix_cache_evicted_pages_total") == 3


def _scrape(url: str, key: str | None = None) -> str:
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
    return r.read().decode()


def test_tenant_names_only_for_the_admin_key_on_the_metrics_port_and_http(engine):
  from jblock.serving.frontend import Frontend, GenerationRequest
  from jblock.serving.http import HttpServer
  from jblock.serving.tenants import Tenants, key_sha256, parse_tenants
  tenants = Tenants(*parse_tenants({"admin_key_sha256": key_sha256("admin-key"), "tenants": [
      {"name": "acme-corp", "api_key_sha256": key_sha256("acme-key"), "models": ["*"]}]}))
  metrics = ServingMetrics(engine)
  frontend = Frontend(engine, tenants, metrics=metrics)
  generation = frontend.generate(frontend.authenticate("acme-key"),
                                 GenerationRequest(model="mock-ids", token_ids=[1, 2], max_tokens=2))
  list(generation)
  port = metrics.start_http(free_port(), "0.0.0.0", is_admin=tenants.is_admin)
  http = HttpServer(frontend, 0)
  http.start()
  try:
    for url in (f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{http.port}/metrics"):
      for key in (None, "acme-key", "wrong"):
        text = _scrape(url, key)
        assert "acme-corp" not in text and "jblock_tenant_" not in text, (url, key)
        assert _sample(text, 'jblock_requests_total{status="OK"}') == 1  # the rest is there
        assert "jblock_queue_depth" in text
      text = _scrape(url, "admin-key")
      assert 'tenant="acme-corp"' in text and _sample(text, "jblock_ttft_seconds_count") == 1
  finally:
    http.stop()
    metrics.stop_http()
    frontend.close()


def test_a_metrics_port_without_an_admin_key_listens_on_loopback_only(engine):
  metrics = ServingMetrics(engine)
  metrics.start_http(free_port(), "0.0.0.0")  # no tenants: no key to check
  try:
    assert metrics._http.server_address[0] == "127.0.0.1"
  finally:
    metrics.stop_http()
