"""The coordinator SIGKILLed under load, then restarted: what is lost and how soon it serves.

A `launch.coordinator` and two `launch.worker` processes, all with default credential flags (the
zoo's cluster token). The run:

1. cold start: the coordinator and workers start; seconds to the first correct token;
2. `streams` greedy requests run; once every one has tokens the coordinator is SIGKILLed, and
   each stream's end is recorded (UNAVAILABLE expected: nothing was lost silently);
3. the coordinator is restarted with the same flags while a client already waits (it retries
   the unreachable server); seconds from the restart to that client's first token and to its
   whole, correct output; blocks each worker read from its zoo before and after (equal: the
   restarted coordinator adopted every block where it was);
4. the interrupted prompts run again: their tokens equal the undisturbed ones.
"""

import concurrent.futures
import os
import subprocess
import sys
import time
from typing import Callable, Sequence

import grpc

from jblock.bench.report import free_loopback_port
from jblock.bench.servers import child_env, stop_process

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(args: Sequence[str], log) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=child_env(),
                          stdout=log, stderr=subprocess.STDOUT, text=True)


def _blocks_loaded(client) -> dict[str, int] | None:
  loaded = {w["address"]: w["load"].get("blocks_loaded") for w in client.stats()["workers"]
            if w["state"] == "alive"}
  return loaded if loaded and None not in loaded.values() else None


def _wait(predicate: Callable, timeout_s: float):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(0.1)
  raise TimeoutError(f"not within {timeout_s}s")


def _first_token(client, model: str, prompt: list[int], new: int, started: float
                 ) -> tuple[list[int], float, float]:
  """(tokens, seconds to the first chunk, seconds to the last) from `started`."""
  tokens, first = [], None
  for chunk in client.generate(model, prompt_tokens=prompt, max_tokens=new, timeout=600):
    first = first if first is not None else time.monotonic() - started
    tokens += chunk.token_ids
  return tokens, first, time.monotonic() - started


def run(zoo_dir: str, models: Sequence[str], streams: int = 16, max_new_tokens: int = 48,
        engine_flags: Sequence[str] = (), log_path: str | None = None,
        progress=print) -> dict:
  from jblock.client import Client
  registry, port = free_loopback_port(), free_loopback_port()
  target = f"127.0.0.1:{port}"
  coordinator = ["launch.coordinator", f"--zoo={zoo_dir}", "--num_workers=2",
                 f"--registry_port={registry}", f"--port={port}", *engine_flags]
  worker = ["launch.worker", f"--coordinator=127.0.0.1:{registry}", f"--zoo={zoo_dir}"]
  prompts = [[(11 * i + j) % 97 + 3 for j in range(4 + 3 * (i % 5))] for i in range(streams)]
  jobs = [(models[i % len(models)], prompts[i]) for i in range(streams)]
  log = open(log_path, "w") if log_path else subprocess.DEVNULL
  procs: list[subprocess.Popen] = []
  out: dict = {"streams": streams, "max_new_tokens": max_new_tokens, "models": list(models),
               "engine_flags": list(engine_flags)}
  try:
    started = time.monotonic()
    procs = [_start(coordinator, log), _start(worker, log), _start(worker, log)]
    with Client(target, retry_s=900) as client:
      model, prompt = jobs[0]
      tokens, first, _ = _first_token(client, model, prompt, max_new_tokens, started)
      out["cold_start_first_token_s"] = round(first, 2)
      progress(f"cold start: first token after {first:.1f}s")
      pool = concurrent.futures.ThreadPoolExecutor(streams)
      undisturbed = list(pool.map(lambda job: client.generate_tokens(
          job[0], prompt_tokens=job[1], max_tokens=max_new_tokens, timeout=600), jobs))
      loaded = _wait(lambda: _blocks_loaded(client), 30)

      # Every stream mid-decode, then the coordinator dies.
      calls = [client.generate(m, prompt_tokens=p, max_tokens=max_new_tokens, timeout=600)
               for m, p in jobs]
      firsts = [next(call).token_ids for call in calls]

      def finish(i: int) -> str:
        try:
          got = list(firsts[i]) + [t for c in calls[i] for t in c.token_ids]
          return "completed" if got == undisturbed[i] else "completed, different tokens"
        except grpc.RpcError as e:
          return e.code().name

      procs[0].kill()
      procs[0].wait(30)
      killed = time.monotonic()
      ends = list(pool.map(finish, range(streams)))
      out["in_flight_at_kill"] = {e: ends.count(e) for e in sorted(set(ends))}
      progress(f"coordinator SIGKILLed: in-flight streams ended {out['in_flight_at_kill']}")

    # A client already waiting when the coordinator comes back.
    time.sleep(1.0)
    restarted = time.monotonic()
    procs[0] = _start(coordinator, log)
    with Client(target, retry_s=300) as client:
      model, prompt = jobs[1]
      tokens, first, whole = _first_token(client, model, prompt, max_new_tokens, restarted)
      out["restart_first_token_s"] = round(first, 2)
      out["restart_whole_output_s"] = round(whole, 2)
      out["restart_output_correct"] = tokens == undisturbed[1]
      out["down_s"] = round(restarted - killed, 2)
      progress(f"restarted: first token after {first:.1f}s, correct={tokens == undisturbed[1]}")
      after = _wait(lambda: _blocks_loaded(client), 30)
      out["blocks_loaded_before"], out["blocks_loaded_after"] = loaded, after
      out["blocks_reloaded"] = sum(after[w] - loaded.get(w, 0) for w in after)
      pool = concurrent.futures.ThreadPoolExecutor(streams)
      again = list(pool.map(lambda job: client.generate_tokens(
          job[0], prompt_tokens=job[1], max_tokens=max_new_tokens, timeout=600), jobs))
      out["rerun_correct"] = sum(a == u for a, u in zip(again, undisturbed))
  finally:
    for proc in procs:
      stop_process(proc, grace_s=10)
    if log is not subprocess.DEVNULL:
      log.close()
  return out
