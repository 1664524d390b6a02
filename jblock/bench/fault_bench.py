"""Worker SIGKILL under load: requests lost or failed, outputs vs an undisturbed run, recovery time.

A coordinator (this process) and two worker processes serve the zoo's models. One pass runs
`streams` concurrent greedy requests undisturbed (the reference); the next runs the same
requests and SIGKILLs the worker hosting the chains' first blocks once every stream has emitted
`kill_after_tokens` tokens. Recovery time: from the kill to the moment every stream that was
still running has emitted its next token (detection, re-hosting from the zoo, first compile on
the survivor and the KV replay all included).
"""

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

from jblock.bench.servers import stop_process
from jblock.cluster.membership import MembershipConfig
from jblock.runtime.engine import EngineConfig


@dataclasses.dataclass(frozen=True)
class FaultBenchSpec:
  streams: int = 32  # concurrent requests
  max_new_tokens: int = 32  # tokens per request
  prompt_len: int = 12  # tokens per prompt
  kill_after_tokens: int = 4  # every stream has this many tokens when the worker dies
  fault: str = "kill"  # kill: SIGKILL (RPCs fail at once); stop: SIGSTOP (only heartbeats tell)
  heartbeat_interval_s: float = 0.2  # worker heartbeats
  dead_after_s: float = 2.0  # heartbeat silence that declares a worker dead


def _timed(handle, times: list[float]) -> None:
  for _ in handle:
    times.append(time.monotonic())


def _run(engine, spec: FaultBenchSpec, models: list[str], kill=None) -> dict:
  prompts = [[(11 * i + 3 * j) % 200 + 1 for j in range(spec.prompt_len)] for i in range(spec.streams)]
  handles = [engine.submit(models[i % len(models)], prompts[i], max_new_tokens=spec.max_new_tokens)
             for i in range(spec.streams)]
  times = [[] for _ in handles]
  threads = [threading.Thread(target=_timed, args=(h, t), daemon=True) for h, t in zip(handles, times)]
  start = time.monotonic()
  for t in threads:
    t.start()
  killed_at, running_at_kill = None, []
  if kill is not None:
    deadline = time.monotonic() + 300
    while min(len(t) for t in times) < spec.kill_after_tokens and time.monotonic() < deadline:
      time.sleep(0.005)
    killed_at, out_wall = time.monotonic(), time.time()
    kill()
    running_at_kill = [i for i, h in enumerate(handles) if not h.done]
  outputs, failed = [], []
  for i, h in enumerate(handles):
    try:
      outputs.append(h.result(timeout=600))
    except Exception as e:
      outputs.append(None)
      failed.append(f"{i}: {type(e).__name__}: {e}")
  for t in threads:
    t.join(10)
  wall = time.monotonic() - start
  out = {"wall_s": round(wall, 3), "tokens": sum(len(o or []) for o in outputs),
         "failed": failed, "outputs": outputs}
  if killed_at is not None:
    out["killed_at"] = out_wall
    after = [next((x for x in times[i] if x > killed_at), None) for i in running_at_kill]
    out["running_at_kill"] = len(running_at_kill)
    out["recovery_s"] = (round(max(a for a in after if a is not None) - killed_at, 3)
                         if any(a is not None for a in after) else None)
  return out


def run(spec: FaultBenchSpec, zoo_dir: str, models: list[str], registry_port: int) -> dict:
  from jblock.cluster import token_file
  from jblock.cluster.links import ClusterLinks
  from jblock.serving.engines import distributed_engine
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  workers = [subprocess.Popen(
      [sys.executable, "-m", "launch.worker", f"--coordinator=127.0.0.1:{registry_port}",
       f"--zoo={zoo_dir}", "--mesh_shape=1,1"], cwd=repo,
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
  config = EngineConfig(batch_size=16, kv_slots=spec.streams, max_seq_len=128,
                        prefill_chunk=16, length_buckets=(16,), warmup=False)
  engine, server = None, None
  try:
    engine, server = distributed_engine(
        zoo_dir, models, 2, registry_port, config=config, wait_s=120, progress=lambda *_: None,
        membership=MembershipConfig(spec.heartbeat_interval_s, spec.dead_after_s),
        links=ClusterLinks(token_file.zoo_credentials(zoo_dir)))
    _run(engine, spec, models)  # compiles every shape on both workers
    reference = _run(engine, spec, models)
    blocks = engine.stats()["blocks"]
    first_worker = next(b["worker"] for b in blocks if b["kind"] == "embed")
    victim = next((p for p in workers if _address_of(p) == first_worker), None)
    if victim is None:
      raise RuntimeError(f"no worker process serves on {first_worker}")
    sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[spec.fault]
    fault = _run(engine, spec, models, kill=lambda: victim.send_signal(sig))
    stats = engine.stats()
    event = stats["recoveries"][-1] if stats["recoveries"] else {}
    equal = sum(a == b for a, b in zip(reference["outputs"], fault["outputs"]))
    return {
        "spec": dataclasses.asdict(spec), "models": models,
        "killed_worker": first_worker,
        "blocks_moved": sum(bool(b["moves"]) for b in stats["blocks"]),
        "blocks": len(stats["blocks"]),
        "workers": [{k: w[k] for k in ("address", "state", "reason")} for w in stats["workers"]],
        "requests": spec.streams, "running_at_kill": fault["running_at_kill"],
        "failed": fault["failed"], "lost": sum(o is None for o in fault["outputs"]) - len(fault["failed"]),
        "outputs_equal": equal, "recovery_s": fault["recovery_s"],
        "detect_s": round(event["at"] - fault["killed_at"], 3) if event else None,
        "rehost_s": event.get("rehost_s"), "tokens_replayed": event.get("tokens_replayed"),
        "requests_paused": event.get("requests_paused"),
        "undisturbed_wall_s": reference["wall_s"], "fault_wall_s": fault["wall_s"],
        "tokens": fault["tokens"],
    }
  finally:
    if server is not None:
      server.stop(0)
    if engine is not None:
      engine.close()
    for p in workers:
      stop_process(p)


def _address_of(proc) -> str:
  """The address a launch.worker process prints once registered ("serving on HOST:PORT")."""
  line = proc.stdout.readline()
  return line.split("serving on ", 1)[1].split()[0] if "serving on " in line else ""
