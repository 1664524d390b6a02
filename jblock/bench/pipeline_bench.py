"""Two workers with every chain split over both: serial vs concurrent vs worker-to-worker.

Each latency's run starts a coordinator (in this process) and two `launch.worker` processes,
places every chain split over both (the planner's demo plan), and runs rounds of `streams`
concurrent greedy requests, measuring tokens per second over each round. Designs:

- `serial`: one executor thread for all workers (one RunBlock in flight at a time), hidden
  states through the coordinator (the earliest coordinator);
- `concurrent`: one executor thread per worker, hidden states through the coordinator;
- `worker_to_worker`: one executor thread per worker, hidden states kept on or pushed between
  the workers (jblock.cluster.rows); the coordinator sees tokens and metadata only.

One cluster per latency; its designs take turns round by round (the executors and the data path
switch between rounds), so a machine whose load changes over time weighs on all designs alike.

The injected latency stands for a slower link: a sleep before each RunBlock on the
coordinator's executor thread and, for worker_to_worker, before each worker-to-worker PutRows
(`launch.worker --hop_latency_ms`), so every RPC that crosses a link pays it once.
"""

import os
import subprocess
import sys
import time

from jblock.bench.servers import stop_process

DESIGNS = ("serial", "concurrent", "worker_to_worker")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(zoo: str, registry: int, latency_ms: float) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "launch.worker",
                           f"--coordinator=127.0.0.1:{registry}", f"--zoo={zoo}",
                           "--mesh_shape=1,1", "--coordinator_timeout_s=5",
                           f"--hop_latency_ms={latency_ms}"],
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


def _traffic_totals(traffic: dict) -> dict:
  keys = ("hidden_bytes_sent", "hidden_bytes_received", "rows_by_reference", "bytes_pushed")
  return {k: sum(t[k] for t in traffic.values()) for k in keys}


class TimedExecutors:
  """The engine's executor factory, switchable between rounds: one thread for all workers
  (serial) or one per worker; each RunBlock timed (`spans`), after the injected latency."""

  def __init__(self, latency_s: float = 0.0):
    self.latency_s = latency_s
    self.serial = False
    self.spans = []  # (worker, start, end)
    self._threads = {}

  def __call__(self, inst, done):
    return _Switched(self, inst.executor_key, done)

  def thread(self, key: str, done):
    from jblock.runtime.executor import ThreadExecutor
    key = "serial" if self.serial else key
    if key not in self._threads:
      self._threads[key] = ThreadExecutor(key, self._run, done)
    return self._threads[key]

  def _run(self, batch):
    if self.latency_s:
      time.sleep(self.latency_s)
    inst = batch.segment.instances[0]
    start = time.perf_counter()
    try:
      return inst.run_batch(batch)
    finally:
      self.spans.append((inst.address, start, time.perf_counter()))

  def close(self) -> None:
    for ex in self._threads.values():
      ex.close()


class _Switched:
  def __init__(self, executors: TimedExecutors, key: str, done):
    self._executors, self._key, self._done = executors, key, done
    self.placement = key

  def submit(self, batch) -> None:
    self._executors.thread(self._key, self._done).submit(batch)

  def close(self) -> None:
    pass  # the threads are shared: TimedExecutors.close


def run_cluster(zoo: str, models, prompts, max_new_tokens: int, latency_s: float,
                repeats: int, progress=print) -> list[dict]:
  """One cluster at one injected latency; the designs take turns, `repeats` measured rounds
  each (after one warm-up round each), so a load that changes over time reaches all alike."""
  from jblock.bench import report
  from jblock.cluster import token_file
  from jblock.cluster.links import ClusterLinks
  from jblock.runtime.engine import EngineConfig
  from jblock.serving.engines import distributed_engine
  registry = report.free_loopback_port()
  streams = len(prompts)
  config = EngineConfig(batch_size=4, kv_slots=streams, max_seq_len=64, prefill_chunk=16,
                        length_buckets=(16,), warmup=False, compilation_cache_dir="")
  executors = TimedExecutors(latency_s)
  procs = [_worker(zoo, registry, latency_s * 1e3) for _ in range(2)]
  engine = server = None
  try:
    engine, server = distributed_engine(zoo, models, 2, registry, config=config, wait_s=180,
                                        progress=lambda *_: None, executor_factory=executors,
                                        links=ClusterLinks(token_file.zoo_credentials(zoo)))
    ledger = engine.replanner.placer.rows
    workers = {b["worker"] for b in engine.stats()["blocks"]}
    jobs = [(models[i % len(models)], prompts[i]) for i in range(streams)]
    rounds = {d: [] for d in DESIGNS}
    for r in range(repeats + 1):
      for design in DESIGNS:
        executors.serial = design == "serial"
        ledger.worker_to_worker = design == "worker_to_worker"
        before = _traffic_totals(engine.stats()["hidden_state_traffic"])
        t0 = time.perf_counter()
        handles = [engine.submit(m, p, max_new_tokens=max_new_tokens) for m, p in jobs]
        tokens = [h.result(timeout=600) for h in handles]
        wall = time.perf_counter() - t0
        if r == 0:
          continue  # warm-up: compiles every shape of this design on both workers
        after = _traffic_totals(engine.stats()["hidden_state_traffic"])
        spans = [sp for sp in executors.spans if sp[1] >= t0]
        rounds[design].append({
            "wall_s": wall, "tokens_per_s": sum(map(len, tokens)) / wall,
            "both_busy": both_busy(spans) / wall, "runblocks": len(spans), "tokens": tokens,
            "coordinator_hidden_bytes": after["hidden_bytes_sent"] + after["hidden_bytes_received"]
            - before["hidden_bytes_sent"] - before["hidden_bytes_received"],
            "worker_to_worker_bytes": after["bytes_pushed"] - before["bytes_pushed"],
            "rows_by_reference": after["rows_by_reference"] - before["rows_by_reference"]})
        progress({"design": design, "hop_latency_ms": latency_s * 1e3, "round": r,
                  "tokens_per_s": round(rounds[design][-1]["tokens_per_s"], 1)})
    out = []
    for design, rs in rounds.items():
      median = sorted(rs, key=lambda x: x["tokens_per_s"])[len(rs) // 2]
      out.append({"design": design, "hop_latency_ms": latency_s * 1e3, "workers": len(workers),
                  "rounds": len(rs),
                  "tokens_per_s": round(median["tokens_per_s"], 2),
                  "tokens_per_s_rounds": [round(x["tokens_per_s"], 1) for x in rs],
                  "both_workers_busy_share": round(median["both_busy"], 3),
                  "runblocks_per_round": median["runblocks"],
                  "coordinator_hidden_bytes_per_round": median["coordinator_hidden_bytes"],
                  "worker_to_worker_bytes_per_round": median["worker_to_worker_bytes"],
                  "rows_by_reference_per_round": median["rows_by_reference"],
                  "tokens": median["tokens"],
                  "same_tokens_every_round": all(x["tokens"] == rs[0]["tokens"] for x in rs)})
    return out
  finally:
    if engine is not None:
      engine.close()
    executors.close()
    if server is not None:
      server.stop(0)
    for p in procs:
      stop_process(p, grace_s=15.0)


def run(zoo: str, streams: int, max_new_tokens: int, latencies_ms, repeats: int = 3,
        progress=print) -> dict:
  """Every design at every latency, side by side in one process; the results dict (per design
  the median round's figures)."""
  from jblock.train import demo
  from jblock.zoo.store import Zoo
  if not os.path.isdir(zoo) or not Zoo(zoo).models():
    demo.build_demo_zoo(zoo)
  models = Zoo(zoo).models()
  prompts = [[(7 * i + j) % 100 + 1 for j in range(4 + i % 5)] for i in range(streams)]
  result = {"streams": streams, "max_new_tokens": max_new_tokens, "models": models,
            "repeats": repeats, "machine": f"{os.cpu_count()} CPU cores, shared with other work",
            "rows": []}
  for ms in latencies_ms:
    rows = run_cluster(zoo, models, prompts, max_new_tokens, float(ms) / 1e3, repeats, progress)
    serial = next(r for r in rows if r["design"] == "serial")
    serial_tokens = serial["tokens"]
    for row in rows:
      row["speedup_vs_serial"] = round(row["tokens_per_s"] / serial["tokens_per_s"], 2)
      row["same_tokens_as_serial"] = row.pop("tokens") == serial_tokens
    result["rows"] += rows
  return result
