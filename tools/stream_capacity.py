"""How many concurrent Generate streams the all-in-one server holds with its default flags.

Starts `launch.serve` (on the demo zoo, built first if missing; or the mock engine), asks each
(model, prompt) once alone, then opens --streams Generate streams at once (greedy, a few
tokens each) and checks that every one completes with the lone request's tokens. Writes N,
completed, wall time, the server's peak in-flight count, peak RSS and peak threads as JSON.

  python -m tools.stream_capacity                                  # N=1000, demo zoo
  python -m tools.stream_capacity --streams=150 --engine=mock --server_flags=--mock_step_delay_s=0.02
"""

import asyncio
import collections
import datetime
import json
import os
import re
import select
import subprocess
import sys
import time

from absl import app
from absl import flags
import grpc

from jblock.bench.results import write_json
from jblock.bench.servers import stop_process
from jblock.client import Client
from jblock.proto import jblock_pb2 as pb
from jblock.proto import jblock_pb2_grpc as pb_grpc

_STREAMS = flags.DEFINE_integer("streams", 1000, "Concurrent Generate streams.", lower_bound=1)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 4, "Tokens per stream (greedy).", lower_bound=1)
_PROMPTS = flags.DEFINE_integer("prompts", 8, "Distinct prompts per model.", lower_bound=1)
_ENGINE = flags.DEFINE_enum("engine", "block", ["block", "mock"], "launch.serve's --engine.")
_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Zoo (block engine); built by --demo if missing.")
_SERVER_FLAGS = flags.DEFINE_list("server_flags", [], "More launch.serve flags (default: none).")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 600.0, "Deadline of each stream.")
_OUT = flags.DEFINE_string("out", None, "JSON file; default tools/results/stream_capacity_DATE.json.")

_READY = re.compile(r"serving on [\d.]+:(\d+) ")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(args: list[str], timeout_s: float = 900.0) -> tuple[subprocess.Popen, str]:
  """launch.serve with `args` and nothing else set; (process, its gRPC address)."""
  env = dict(os.environ)
  # The suite forces 8 host devices; a served CPU model uses one, as in deployment.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  proc = subprocess.Popen([sys.executable, "-m", "launch.serve", "--port=0", "--http_port=-1",
                           *args], cwd=_REPO, env=env, stdout=subprocess.PIPE, text=True)
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline and proc.poll() is None:
    if select.select([proc.stdout], [], [], 0.2)[0]:
      match = _READY.search(proc.stdout.readline())
      if match:
        return proc, f"127.0.0.1:{match.group(1)}"
  stop_process(proc)
  raise RuntimeError(f"launch.serve did not get ready (exit status {proc.returncode})")


def _proc_status(pid: int) -> dict[str, int]:
  """VmHWM (peak RSS, bytes) and Threads of a process, from /proc."""
  out = {}
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key == "VmHWM":
        out["peak_rss_bytes"] = int(value.split()[0]) * 1024
      elif key == "Threads":
        out["threads"] = int(value)
  return out


async def _burst(target: str, jobs: list, timeout_s: float, pid: int) -> dict:
  """Opens every job's stream at once; counts outcomes while sampling the server's load."""
  peak = {"in_flight": 0, "threads": 0}
  tokens, errors = [None] * len(jobs), collections.Counter()
  async with grpc.aio.insecure_channel(target) as channel:
    stub = pb_grpc.InferenceStub(channel)

    async def one(i, model, prompt):
      request = pb.GenerateRequest(model=model, tokens=pb.TokenIds(ids=prompt),
                                   max_tokens=_MAX_TOKENS.value, temperature=0.0)
      try:
        out = []
        async for response in stub.Generate(request, timeout=timeout_s):
          out += response.token_ids
        tokens[i] = out
      except grpc.aio.AioRpcError as e:
        errors[f"{e.code().name}: {e.details()}"] += 1

    async def sample(done: asyncio.Event):
      while not done.is_set():
        health = await stub.Health(pb.HealthRequest(), timeout=30)
        peak["in_flight"] = max(peak["in_flight"], health.in_flight)
        peak["threads"] = max(peak["threads"], _proc_status(pid).get("threads", 0))
        await asyncio.sleep(0.05)

    done = asyncio.Event()
    sampler = asyncio.create_task(sample(done))
    start = time.perf_counter()
    await asyncio.gather(*(one(i, m, p) for i, (m, p) in enumerate(jobs)))
    wall = time.perf_counter() - start
    done.set()
    await sampler
  return {"tokens": tokens, "errors": dict(errors), "wall_s": round(wall, 3),
          "peak_in_flight": peak["in_flight"], "server_peak_threads": peak["threads"]}


def measure(target: str, pid: int, streams: int, prompts: int, timeout_s: float) -> dict:
  with Client(target) as client:
    models = client.list_models()
    pairs = [(m.name, [(7 * i + j) % min(m.vocab_size, 200) + 1 for j in range(3 + i % 5)])
             for m in models for i in range(prompts)]
    lone = {(name, tuple(p)): client.generate_tokens(name, prompt_tokens=p,
                                                     max_tokens=_MAX_TOKENS.value,
                                                     temperature=0.0, timeout=timeout_s)
            for name, p in pairs}
  jobs = [pairs[i % len(pairs)] for i in range(streams)]
  burst = asyncio.run(_burst(target, jobs, timeout_s, pid))
  got = burst.pop("tokens")
  completed = sum(t is not None for t in got)
  correct = sum(t == lone[m, tuple(p)] for t, (m, p) in zip(got, jobs) if t is not None)
  return {"streams": streams, "completed": completed, "correct_tokens": correct,
          "models": [m.name for m in models], "max_tokens": _MAX_TOKENS.value, **burst}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _ENGINE.value == "block":  # built here, so the server's peak RSS is serving's alone
    from jblock.train import demo
    demo.build_demo_zoo(_ZOO.value)
  args = [f"--engine={_ENGINE.value}"] + (
      [f"--zoo={_ZOO.value}"] if _ENGINE.value == "block" else []) + _SERVER_FLAGS.value
  proc, target = start_server(args)
  try:
    result = measure(target, proc.pid, _STREAMS.value, _PROMPTS.value, _TIMEOUT_S.value)
    result["server_peak_rss_bytes"] = _proc_status(proc.pid)["peak_rss_bytes"]
  finally:
    stop_process(proc, grace_s=30.0)
  result.update(engine=_ENGINE.value, server_args=args, cpus=os.cpu_count(),
                date=datetime.datetime.now().isoformat(timespec="seconds"))
  print(json.dumps(result, indent=2))
  out = _OUT.value
  if out is None:
    out = f"tools/results/stream_capacity_{datetime.date.today():%Y%m%d}.json"
  write_json(out, result)
  if result["correct_tokens"] != result["streams"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
