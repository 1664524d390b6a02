"""Runs the coordinator until SIGTERM/SIGINT, then drains: the body of launch/serve.py."""

import logging
import signal
import threading

from jblock.runtime.engine_api import Engine
from jblock.serving.coordinator import build_server
from jblock.serving.metrics import ServingMetrics

# Printed (and flushed) once the server listens; scripts and tests wait for it.
READY_LINE = "jblock: serving on {host}:{port} (metrics port {metrics_port})"


def serve(engine: Engine, port: int, metrics_port: int = 0, *, host: str = "127.0.0.1",
          max_workers: int = 64, drain_timeout_s: float = 30.0, close_engine: bool = True,
          stop: threading.Event | None = None) -> bool:
  """Serves `engine` on host:port (0 = a free port) and Prometheus metrics on
  `metrics_port` (0 = off) until SIGTERM or SIGINT (or `stop` is set).

  Then stops accepting requests (UNAVAILABLE), lets in-flight ones finish for up to
  `drain_timeout_s`, stops the server and closes the engine. Returns True if every in-flight
  request finished. Signals are caught only when called from the main thread.
  """
  stop = stop or threading.Event()
  metrics = ServingMetrics(engine)
  server, bound_port = build_server(engine, port, host, max_workers, metrics=metrics)
  previous_handlers = {}
  if threading.current_thread() is threading.main_thread():
    for signum in (signal.SIGTERM, signal.SIGINT):
      previous_handlers[signum] = signal.signal(signum, lambda *_: stop.set())
  drained = False
  try:
    server.start()
    metrics_bound = metrics.start_http(metrics_port, host)
    print(READY_LINE.format(host=host, port=bound_port, metrics_port=metrics_bound), flush=True)
    # Short waits: the main thread must get back to the interpreter to run signal handlers.
    while not stop.wait(0.2):
      pass
    logging.info("jblock: draining (up to %.1fs for %d in-flight requests)", drain_timeout_s,
                 server.drain_state.in_flight)
    drained = server.drain(drain_timeout_s)
    if not drained:
      logging.warning("jblock: drain timed out; the requests still running were cancelled")
  finally:
    server.stop(0)
    metrics.stop_http()
    if close_engine:
      engine.close()
    for signum, handler in previous_handlers.items():
      signal.signal(signum, handler)
  return drained
