"""Round-trip cost of the gRPC path over calling the engine in process, measured side by side."""

import statistics
import time
from typing import Any

from jblock.client import Client
from jblock.serving.coordinator import build_server


def measure(engine, model: str, prompt: list[int], new_tokens: int, rounds: int) -> dict[str, Any]:
  """Alternates in-process and loopback-gRPC requests (greedy, same prompt) on one engine."""
  server, port = build_server(engine, 0)
  server.start()
  direct, remote = [], []
  try:
    with Client(f"127.0.0.1:{port}") as client:
      for _ in range(2):  # warm both paths
        engine.submit(model, prompt, max_new_tokens=new_tokens).result(300)
        client.generate_tokens(model, prompt_tokens=prompt, max_tokens=new_tokens, timeout=300)
      for _ in range(rounds):
        t0 = time.perf_counter()
        a = engine.submit(model, prompt, max_new_tokens=new_tokens).result(300)
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = client.generate_tokens(model, prompt_tokens=prompt, max_tokens=new_tokens, timeout=300)
        remote.append(time.perf_counter() - t0)
        if a != b:
          raise AssertionError(f"gRPC tokens {b} differ from in-process tokens {a}")
  finally:
    server.stop(0)
  d, r = statistics.median(direct), statistics.median(remote)
  return {"model": model, "prompt_tokens": len(prompt), "new_tokens": new_tokens, "rounds": rounds,
          "in_process_median_ms": 1e3 * d, "grpc_median_ms": 1e3 * r,
          "overhead_ms_per_request": 1e3 * (r - d), "overhead_ms_per_token": 1e3 * (r - d) / new_tokens,
          "ratio": r / d}
