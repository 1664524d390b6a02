"""The open-loop load driver: sends each planned request at its arrival time over gRPC.

Open loop means arrivals do not wait for earlier responses (a closed loop would hide queueing:
a slow server would simply be sent less). Each in-flight request has its own thread, which
streams the tokens back and stamps the first one (TTFT) and the last (end-to-end latency).
"""

import dataclasses
import threading
import time
from typing import Callable, Sequence

import grpc

from jblock.bench.workload import PlannedRequest
from jblock.client import Client


@dataclasses.dataclass
class RequestResult:
  index: int
  model: str
  prompt_len: int
  max_new_tokens: int
  send_lag_s: float = 0.0  # how late the driver sent it after its planned arrival
  ttft_s: float | None = None  # send -> first token
  latency_s: float | None = None  # send -> last message
  tokens: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  error: str | None = None  # gRPC status name and message when the request failed

  @property
  def ok(self) -> bool:
    return self.error is None and self.latency_s is not None and bool(self.tokens)

  @property
  def tpot_s(self) -> float | None:
    """(latency − TTFT) / (output tokens − 1): the mean gap between streamed tokens."""
    if not self.ok or len(self.tokens) < 2:
      return None
    return (self.latency_s - self.ttft_s) / (len(self.tokens) - 1)


@dataclasses.dataclass
class RunResult:
  results: list[RequestResult]
  wall_s: float  # first send -> last request done (or given up)
  offered_rate: float  # planned requests / planned span


def _send(client: Client, req: PlannedRequest, model: str, out: RequestResult,
          timeout_s: float) -> None:
  start = time.monotonic()
  try:
    stream = client.generate(model, prompt_tokens=req.prompt_tokens,
                             max_tokens=req.max_new_tokens, temperature=0.0, seed=0,
                             timeout=timeout_s)
    for chunk in stream:
      if chunk.token_ids:
        if out.ttft_s is None:
          out.ttft_s = time.monotonic() - start
        out.tokens.extend(chunk.token_ids)
      if chunk.finish_reason is not None:
        out.finish_reason = chunk.finish_reason
    out.latency_s = time.monotonic() - start
  except grpc.RpcError as e:
    out.error = f"{e.code().name}: {e.details()}"
  except Exception as e:  # a driver bug must not hide the other requests' results
    out.error = f"{type(e).__name__}: {e}"


def run_open_loop(target: str, requests: Sequence[PlannedRequest], model_names: Sequence[str],
                  timeout_s: float = 120.0,
                  progress: Callable[[int, int], None] | None = None) -> RunResult:
  """Sends `requests` to the server at `target`; request.variant indexes `model_names`.

  Every request gets `timeout_s` (a gRPC deadline, so the server cancels it too); the run
  ends when all requests finished or failed.
  """
  results = [RequestResult(r.index, model_names[r.variant], len(r.prompt_tokens),
                           r.max_new_tokens) for r in requests]
  threads = []
  with Client(target, options=[("grpc.max_concurrent_streams", 4096)]) as client:
    t0 = time.monotonic()
    for req, out in zip(requests, results):
      delay = t0 + req.arrival_s - time.monotonic()
      if delay > 0:
        time.sleep(delay)
      out.send_lag_s = max(0.0, time.monotonic() - (t0 + req.arrival_s))
      thread = threading.Thread(target=_send, args=(client, req, out.model, out, timeout_s),
                                daemon=True)
      thread.start()
      threads.append(thread)
      if progress:
        progress(sum(r.latency_s is not None or r.error is not None for r in results),
                 len(results))
    for i, thread in enumerate(threads):
      # Bounded: each request ends by its deadline; the margin covers the stream's teardown.
      thread.join(max(0.0, t0 + requests[i].arrival_s + timeout_s + 10.0 - time.monotonic()))
      if progress and i % 8 == 0:
        progress(sum(r.latency_s is not None or r.error is not None for r in results),
                 len(results))
    wall = time.monotonic() - t0
  for out, thread in zip(results, threads):
    if thread.is_alive() and out.error is None:
      out.error = "DRIVER_TIMEOUT: the stream did not end"
  span = requests[-1].arrival_s if requests else 0.0
  offered = len(requests) / span if span > 0 else 0.0
  return RunResult(results, wall, offered)


def warm_up(target: str, model_names: Sequence[str], prompt_len: int, max_new_tokens: int,
            timeout_s: float = 300.0) -> None:
  """One request per model before measuring: first-call costs are not the workload's."""
  with Client(target) as client:
    for name in model_names:
      client.generate_tokens(name, prompt_tokens=[1] * prompt_len, max_tokens=max_new_tokens,
                             timeout=timeout_s)
