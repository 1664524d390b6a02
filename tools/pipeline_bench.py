"""Two workers computing at once vs the serial design, at the same load.

  python -m tools.pipeline_bench [--zoo=checkpoints/zoo] [--streams=16] [--max_new_tokens=16]
                                 [--hop_latency_ms=0,5]

For each injected per-hop latency and each design, starts a coordinator (in this process) and
two `launch.worker` processes, places every chain split over both (the planner's demo plan),
runs one warm-up round (compiles), then --streams concurrent greedy requests, and measures
tokens per second over that round. `pipelined`: one executor thread per worker (this engine);
`serial`: one executor thread for all workers, so one RunBlock is in flight at a time (the
earlier coordinator). The latency is a sleep before each RunBlock on the executor thread (as a
slower link would add); this 2-core machine runs both workers and the coordinator, so without it
the compute of the two workers competes for the same cores. Also reports the share of the
round during which both workers had a RunBlock in flight (timed around each RPC) and whether the
two designs gave the same tokens. Writes tools/results/pipeline_bench_<timestamp>.json.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Block zoo (the demo zoo is built if empty).")
_STREAMS = flags.DEFINE_integer("streams", 16, "Concurrent requests.", lower_bound=1)
_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Tokens per request.", lower_bound=1)
_LATENCY = flags.DEFINE_list("hop_latency_ms", ["0", "5"], "Injected latency per RunBlock.")
_OUT = flags.DEFINE_string("out", "tools/results", "Where the JSON goes.")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(zoo: str, registry: int) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "launch.worker",
                           f"--coordinator=127.0.0.1:{registry}", f"--zoo={zoo}",
                           "--mesh_shape=1,1", "--coordinator_timeout_s=5"],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def both_busy(spans) -> float:
  """Seconds during which two workers each had a RunBlock in flight; spans: (worker, start, end)."""
  events = []
  for w, start, end in spans:
    events += [(start, w, 1), (end, w, -1)]
  busy = {w: 0 for w, _, _ in spans}
  both, last = 0.0, None
  for at, w, step in sorted(events):
    if last is not None and len(busy) >= 2 and all(v > 0 for v in busy.values()):
      both += at - last
    busy[w] += step
    last = at
  return both


def run_one(zoo: str, models, prompts, latency_s: float, serial: bool) -> dict:
  from jblock.runtime.engine import EngineConfig
  from jblock.runtime.executor import ThreadExecutor
  from jblock.serving.engines import distributed_engine
  from jblock.bench import report
  registry = report.free_loopback_port()
  shared = {}

  spans = []  # (worker, start, end) of every RunBlock, as its executor thread ran it

  def run(batch):
    if latency_s:
      time.sleep(latency_s)
    inst = batch.segment.instances[0]
    start = time.perf_counter()
    try:
      return inst.run_batch(batch)
    finally:
      spans.append((inst.address, start, time.perf_counter()))

  def executor(inst, done):
    key = "serial" if serial else inst.executor_key
    if key not in shared:
      shared[key] = ThreadExecutor(key, run, done)
    return shared[key]

  config = EngineConfig(batch_size=4, kv_slots=_STREAMS.value, max_seq_len=64, prefill_chunk=16,
                        length_buckets=(16,), warmup=False, compilation_cache_dir="")
  procs = [_worker(zoo, registry), _worker(zoo, registry)]
  engine = server = None
  try:
    engine, server = distributed_engine(zoo, models, 2, registry, config=config, wait_s=180,
                                        progress=lambda *_: None, executor_factory=executor)
    jobs = [(models[i % len(models)], prompts[i]) for i in range(_STREAMS.value)]
    for h in [engine.submit(m, p, max_new_tokens=_NEW.value) for m, p in jobs]:
      h.result(timeout=600)  # warm-up: compiles every shape on both workers
    t0 = time.perf_counter()
    handles = [engine.submit(m, p, max_new_tokens=_NEW.value) for m, p in jobs]
    tokens = [h.result(timeout=600) for h in handles]
    wall = time.perf_counter() - t0
    measured = [sp for sp in spans if sp[1] >= t0]  # the measured round only
    return {"design": "serial" if serial else "pipelined", "hop_latency_ms": latency_s * 1e3,
            "wall_s": round(wall, 3), "tokens_per_s": round(sum(map(len, tokens)) / wall, 2),
            "both_workers_busy_share": round(both_busy(measured) / wall, 3),
            "runblocks": len(measured), "tokens": tokens}
  finally:
    if engine is not None:
      engine.close()
    if server is not None:
      server.stop(0)
    for p in procs:
      p.terminate()
      try:
        p.wait(timeout=15)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


def main(argv):
  del argv
  from jblock import demo
  from jblock.zoo.store import Zoo
  if not os.path.isdir(_ZOO.value) or not Zoo(_ZOO.value).models():
    demo.build_demo_zoo(_ZOO.value)
  models = Zoo(_ZOO.value).models()
  prompts = [[(7 * i + j) % 100 + 1 for j in range(4 + i % 5)] for i in range(_STREAMS.value)]
  rows = []
  for ms in _LATENCY.value:
    for serial in (True, False):
      rows.append(run_one(_ZOO.value, models, prompts, float(ms) / 1e3, serial))
      print({k: v for k, v in rows[-1].items() if k != "tokens"}, flush=True)
  result = {"streams": _STREAMS.value, "max_new_tokens": _NEW.value, "models": models,
            "machine": f"{os.cpu_count()} CPU cores, shared with other work", "rows": []}
  for ms in _LATENCY.value:
    serial, piped = [r for r in rows if r["hop_latency_ms"] == float(ms)]
    result["rows"] += [{k: v for k, v in r.items() if k != "tokens"} for r in (serial, piped)]
    result["rows"][-1]["speedup_vs_serial"] = round(piped["tokens_per_s"] / serial["tokens_per_s"], 2)
    result["rows"][-1]["same_tokens_as_serial"] = piped["tokens"] == serial["tokens"]
  from jblock.bench import report
  path = report.results_path(_OUT.value, "pipeline_bench")
  report.write_json(result, path)
  print(json.dumps(result, indent=2))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
