"""Runs the coordinator until SIGTERM/SIGINT, then drains: the body of launch/serve.py."""

import logging
import signal
import threading
import time

from jblock.cluster.security import ClusterCredentials
from jblock.runtime.engine_api import Engine
from jblock.serving.coordinator import build_server
from jblock.serving.frontend import DEFAULT_MAX_REQUEST_BYTES, Frontend
from jblock.serving.metrics import ServingMetrics
from jblock.serving.tenants import Tenants
from jblock.serving.tool_calls import DEFAULT_TOOL_CALL_PARSER

# Printed (and flushed) once the server listens, the only line on stdout: scripts and tests
# wait for it.
READY_LINE = "jblock: serving on {host}:{port} (metrics port {metrics_port}) http {http}{note}"
OPEN_NOTE = "; open: no --tenants, so no API keys, Admin for anyone, 127.0.0.1 only"


def serve(engine: Engine, port: int, metrics_port: int = 0, *, host: str = "127.0.0.1",
          max_workers: int | None = None, drain_timeout_s: float = 30.0, close_engine: bool = True,
          stop: threading.Event | None = None, http_port: int | None = None,
          tenants: Tenants | None = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, tokenize_workers: int = 2,
          tls: ClusterCredentials | None = None,
          tool_call_parser: str = DEFAULT_TOOL_CALL_PARSER) -> bool:
  """Serves `engine` over gRPC on host:port (0 = a free port), the OpenAI-compatible HTTP API
  on `http_port` (None = off, 0 = a free port) and Prometheus metrics on `metrics_port`
  (0 = off) until SIGTERM or SIGINT (or `stop` is set). With `tls` (certificate and key) the
  gRPC and HTTP ports speak TLS. `max_workers`: calls served at once (None: sized from the
  engine's admission limit; see coordinator.build_server).

  Metrics: per-tenant series only for scrapes with the admin key; without `tenants` (no admin
  key) the metrics port listens on 127.0.0.1 only.

  Without `tenants` the server is open, so it listens on 127.0.0.1 whatever `host` says.
  Then stops accepting requests (UNAVAILABLE / 503, health NOT_SERVING), lets in-flight ones
  finish for up to `drain_timeout_s`, stops the servers and closes the engine. Returns True
  if every in-flight request finished. Signals are caught only when called from the main
  thread.
  """
  if tenants is None:
    if host != "127.0.0.1":
      logging.warning("jblock: --host=%s ignored: without --tenants the server listens on "
                      "127.0.0.1 only", host)
    host = "127.0.0.1"
    logging.warning("jblock: no --tenants file: the server is open (no API keys, Admin for "
                    "anyone) and listens on 127.0.0.1 only")
  stop = stop or threading.Event()
  metrics = ServingMetrics(engine)
  # Every stream's prompt passes the tokenizer pool before the engine's queue, so the pool's
  # queue takes a burst as large as the engine admits (1,000 streams opened at once overflowed
  # its default of 32). The queued work stays bounded: each prompt was refused by its byte size
  # before queueing if its model's context cannot hold it (prompts.py), and the pool keeps its
  # `tokenize_workers` threads.
  frontend = Frontend(engine, tenants, metrics=metrics, max_request_bytes=max_request_bytes,
                      tokenize_workers=tokenize_workers,
                      tokenize_queue=max(32, engine.admission_limit()))
  server, bound_port = build_server(engine, port, host, max_workers, metrics=metrics,
                                    frontend=frontend, max_message_bytes=max_request_bytes,
                                    tls=tls)
  http_server = None
  previous_handlers = {}
  if threading.current_thread() is threading.main_thread():
    for signum in (signal.SIGTERM, signal.SIGINT):
      previous_handlers[signum] = signal.signal(signum, lambda *_: stop.set())
  drained = False
  try:
    server.start()
    if http_port is not None:
      from jblock.serving.http import HttpServer  # FastAPI: only when HTTP is on
      http_server = HttpServer(frontend, http_port, host, max_body_bytes=max_request_bytes,
                               tls_files=(tls.cert_path, tls.key_path) if tls and tls.tls else None,
                               tool_call_parser=tool_call_parser)
      http_server.start()
    metrics_bound = metrics.start_http(
        metrics_port, host, tls_files=(tls.cert_path, tls.key_path) if tls and tls.tls else None,
        is_admin=tenants.is_admin if tenants is not None else None)
    http = f"on {host}:{http_server.port}" if http_server else "off"
    print(READY_LINE.format(host=host, port=bound_port, metrics_port=metrics_bound, http=http,
                            note="" if tenants is not None else OPEN_NOTE), flush=True)
    # Short waits: the main thread must get back to the interpreter to run signal handlers.
    while not stop.wait(0.2):
      pass
    # On stdout like the ready line: an operator watching a SIGTERM sees it start and end.
    in_flight, started = server.drain_state.in_flight, time.monotonic()
    print(f"jblock: draining: no new requests; waiting up to {drain_timeout_s:g}s for "
          f"{in_flight} in flight", flush=True)
    drained = server.drain(drain_timeout_s)
    if drained:
      print(f"jblock: drained in {time.monotonic() - started:.1f}s; exiting", flush=True)
    else:
      print(f"jblock: drain timed out after {drain_timeout_s:g}s; the "
            f"{server.drain_state.in_flight} requests still running were cancelled", flush=True)
  finally:
    server.stop(0)
    if http_server is not None:
      http_server.stop()
    metrics.stop_http()
    frontend.close()
    if close_engine:
      engine.close()
    for signum, handler in previous_handlers.items():
      signal.signal(signum, handler)
  return drained
