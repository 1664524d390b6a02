"""Serving N full fine-tunes per-model vs assembled, side by side through the engine.

Material: the Pareto sweep's (jblock.train.pareto): N full fine-tunes of one byte-level base,
each assembled from the base's blocks at one budget (default top-1 >= 0.97 on the fitting
split, checked on the held-out split). Three engines (Engine.from_zoo, sharing on) are open at
once in one process: one serving the N originals, one the N assembled models with the default
segment cut (a shared block's rows batch across models, so an assembled chain that alternates
its own and the base's blocks runs as several calls), and one with the assembled models fused
through the shared blocks (EngineConfig.fuse_through_shared: one call per model per step,
weights still held once, batches per model). Rounds rotate between them; each round submits the same multi-tenant workload at once (one tenant per model,
`per_tenant` requests each, prompts cut from the held-out tail of the corpus, greedy decoding,
no rerouting). Reported per engine: resident param bytes (engine stats), throughput (generated
tokens / round wall time), p50/p95 end-to-end latency; per model: held-out perplexity of the
original and the assembled model (the equivalence harness, through the engine's block
functions) and the share of greedy tokens the two engines served identically.
"""

import dataclasses
import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from jblock.runtime.engine import Engine, EngineConfig
from jblock.train import pareto
from jblock.zoo import assemble as asm
from jblock.zoo.equivalence import DEFAULT_CALIBRATION, Equivalence
from jblock.zoo.store import Zoo


def assemble_all(zoo, names: Sequence[str], budget: asm.Budget, m: pareto.Material,
                 say: Callable[[str], None]) -> list[dict[str, Any]]:
  """Assembles every model at the budget; its name, chain and held-out metrics."""
  out = []
  for n in names:
    calibration = Equivalence(zoo, n, DEFAULT_CALIBRATION, seq_len=m.seq_len, max_windows=64,
                              holdout=m.holdout).calibration
    a = asm.assemble(zoo, n, pareto._model_name(n, budget), max_kl=budget.max_kl,
                     min_top1=budget.min_top1, calibration=calibration, overwrite=True)
    out.append({"model": n, "assembled": a["name"],
                "substitutions": [s["position"] for s in a["substitutions"]],
                "bytes_saved": a["bytes_saved"], "model_bytes": a["model_bytes"],
                "holdout": a["holdout"]})
    say(f"{n}: {len(out[-1]['substitutions'])} substitutions, held-out top-1 "
        f"{a['holdout']['top1']:.4f}, perplexity {a['holdout']['perplexity']:.3f} vs "
        f"{a['holdout']['perplexity_original']:.3f}")
  return out


def workload(n_models: int, per_tenant: int, prompt_len: int, holdout: float,
             seed: int) -> list[tuple[int, list[int]]]:
  """(model index, prompt) for every request, shuffled; prompts are cut from the held-out tail."""
  tokens = pareto.corpus_tokens()
  tail = tokens[tokens.size - int(round(tokens.size * holdout)):]
  rng = np.random.default_rng(seed)
  jobs = []
  for i in range(n_models):
    for _ in range(per_tenant):
      start = int(rng.integers(0, tail.size - prompt_len))
      jobs.append((i, tail[start:start + prompt_len].tolist()))
  return [jobs[j] for j in rng.permutation(len(jobs))]


def timed_round(engine, models: Sequence[str], jobs, new_tokens: int) -> dict[str, Any]:
  """Submits every job at once; latency per request, generated tokens and wall time."""
  results: list[Any] = [None] * len(jobs)
  lat = [0.0] * len(jobs)
  threads = []
  start = time.perf_counter()
  for j, (i, prompt) in enumerate(jobs):
    submitted = time.perf_counter()
    handle = engine.submit(models[i], prompt, max_new_tokens=new_tokens, tenant=f"t{i}",
                           accuracy_budget=0.0)

    def wait(h=handle, s=submitted, j=j):
      results[j] = h.result(timeout=600)
      lat[j] = time.perf_counter() - s

    th = threading.Thread(target=wait)
    th.start()
    threads.append(th)
  for th in threads:
    th.join(600)
  wall = time.perf_counter() - start
  if any(r is None for r in results):
    raise RuntimeError("a request did not finish within 600 s")
  tokens = [list(r) for r in results]
  return {"latency_s": lat, "tokens": tokens, "wall_s": wall,
          "generated": sum(len(t) for t in tokens)}


def run(work_dir: str, n: int = 8, budget: asm.Budget | None = None,
        finetune_lr: float = 1e-4, finetune_steps: int = 30, per_tenant: int = 4, new_tokens: int = 16,
        prompt_len: int = 32, rounds: int = 4, warm_rounds: int = 3, batch_size: int = 8,
        say=print) -> dict[str, Any]:
  budget = budget or asm.Budget(min_top1=0.97)
  m = pareto.Material(n=n, finetune_lr=finetune_lr, finetune_steps=finetune_steps)
  os.makedirs(work_dir, exist_ok=True)
  zoo = Zoo(os.path.join(work_dir, "zoo"))
  names = pareto.build_zoo(zoo, work_dir, m, say)
  assembled = assemble_all(zoo, names, budget, m, say)
  assembled_names = [a["assembled"] for a in assembled]
  modes = {"per_model": list(names), "assembled": assembled_names,
           "assembled_fused": assembled_names}
  config = EngineConfig(batch_size=batch_size, kv_slots=max(32, n * per_tenant),
                        max_seq_len=prompt_len + new_tokens + 16, prefill_chunk=prompt_len,
                        length_buckets=(prompt_len,))
  configs = {"per_model": config, "assembled": config,
             "assembled_fused": dataclasses.replace(config, fuse_through_shared=True)}
  engines = {mode: Engine.from_zoo(zoo.root, models, mesh_shape=(1, 1), config=configs[mode])
             for mode, models in modes.items()}
  out: dict[str, Any] = {"material": pareto.material_dict(m), "budget": budget.to_dict(),
                         "config": {"per_tenant": per_tenant, "new_tokens": new_tokens,
                                    "prompt_len": prompt_len, "rounds": rounds,
                                    "warm_rounds": warm_rounds, "batch_size": batch_size,
                                    "tenants": n},
                         "assembled": assembled, "warm_rounds": [], "rounds": []}
  try:
    resident = {mode: e.stats()["resident_bytes"] for mode, e in engines.items()}
    # Dispatches per decode step of a model = its segments (fused runs of blocks).
    out["segments_per_model"] = {mode: {name: len(segs) for name, segs in
                                        e.stats()["segments"].items()}
                                 for mode, e in engines.items()}
    # Unmeasured rounds first: batches that mix models through a shared block reach shapes
    # start-up warm-up does not compile, and which ones depends on the interleaving.
    for w in range(warm_rounds):
      warm = workload(n, per_tenant, prompt_len, m.holdout, seed=1000 + w)
      for mode, e in engines.items():
        res = timed_round(e, modes[mode], warm, new_tokens)
        out["warm_rounds"].append({"mode": mode, "wall_s": res["wall_s"],
                                   "generated": res["generated"]})
        say(f"warm-up {w} {mode:9s} {res['wall_s']:.2f} s")
    served: dict[str, list] = {mode: [] for mode in modes}
    for r in range(rounds):
      jobs = workload(n, per_tenant, prompt_len, m.holdout, seed=r)
      order = list(modes)[r % len(modes):] + list(modes)[:r % len(modes)]
      for mode in order:
        res = timed_round(engines[mode], modes[mode], jobs, new_tokens)
        served[mode].append((jobs, res["tokens"]))
        out["rounds"].append({"mode": mode, "latency_s": res["latency_s"], "wall_s": res["wall_s"],
                              "generated": res["generated"]})
        say(f"round {r} {mode:9s} {res['generated'] / res['wall_s']:.1f} tok/s, p95 "
            f"{np.percentile(res['latency_s'], 95):.3f}s")
  finally:
    for e in engines.values():
      e.close()
  summary = {}
  for mode in modes:
    rs = [r for r in out["rounds"] if r["mode"] == mode]
    lat = [x for r in rs for x in r["latency_s"]]
    summary[mode] = {"resident_bytes": int(resident[mode]),
                     "tok_per_s": sum(r["generated"] for r in rs) / sum(r["wall_s"] for r in rs),
                     "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
                     # Robust to a round that still compiled a new shape.
                     "median_round_tok_per_s": float(np.median(
                         [r["generated"] / r["wall_s"] for r in rs])),
                     "median_round_p95_s": float(np.median(
                         [np.percentile(r["latency_s"], 95) for r in rs]))}
  p = summary["per_model"]
  for mode in ("assembled", "assembled_fused"):
    a = summary[mode]
    summary[f"ratios_{mode}_over_per_model"] = {k: a[k] / p[k] for k in (
        "resident_bytes", "tok_per_s", "p50_s", "p95_s", "median_round_tok_per_s",
        "median_round_p95_s")}
  out["summary"] = summary
  out["per_model"] = _per_model(names, assembled, served)
  return out


def _agreement(served, mode: str, n_models: int) -> dict[int, float]:
  """Per model: the share of greedy tokens `mode` served as the per-model engine did."""
  same = {i: [0, 0] for i in range(n_models)}
  for (jobs, ref), (_, got) in zip(served["per_model"], served[mode]):
    for (i, _), x, y in zip(jobs, ref, got):
      same[i][0] += sum(int(u == v) for u, v in zip(x, y))
      same[i][1] += max(len(x), len(y))
  return {i: s / max(t, 1) for i, (s, t) in same.items()}


def _per_model(names, assembled, served) -> list[dict[str, Any]]:
  """Held-out perplexity of each original and its assembly, and the share of greedy tokens the
  assembled engines served as the per-model one did (position by position)."""
  same = _agreement(served, "assembled", len(names))
  fused = _agreement(served, "assembled_fused", len(names))
  return [{"model": n, "assembled": a["assembled"], "substitutions": a["substitutions"],
           "perplexity_original": a["holdout"]["perplexity_original"],
           "perplexity_assembled": a["holdout"]["perplexity"],
           "holdout_top1": a["holdout"]["top1"], "holdout_kl": a["holdout"]["kl"],
           "served_token_agreement": same[i], "served_token_agreement_fused": fused[i]}
          for i, (n, a) in enumerate(zip(names, assembled))]


def table_lines(result: dict[str, Any]) -> list[str]:
  """Markdown: the two engines side by side, then held-out perplexity per model."""
  s = result["summary"]
  lines = ["| serving | resident param bytes | throughput (tok/s) | p50 latency | p95 latency | "
           "median round: tok/s, p95 |", "|---|---|---|---|---|---|"]
  for mode in ("per_model", "assembled", "assembled_fused"):
    v = s[mode]
    lines.append(f"| {mode.replace('_', '-')} | {v['resident_bytes']:,} | {v['tok_per_s']:.1f} | "
                 f"{v['p50_s']:.3f} s | {v['p95_s']:.3f} s | {v['median_round_tok_per_s']:.1f}, "
                 f"{v['median_round_p95_s']:.3f} s |")
  for mode in ("assembled", "assembled_fused"):
    r = s[f"ratios_{mode}_over_per_model"]
    lines.append(f"| {mode.replace('_', '-')} / per-model | {r['resident_bytes']:.2f}x | "
                 f"{r['tok_per_s']:.2f}x | {r['p50_s']:.2f}x | {r['p95_s']:.2f}x | "
                 f"{r['median_round_tok_per_s']:.2f}x, {r['median_round_p95_s']:.2f}x |")
  lines += ["", "| model | substituted positions | held-out perplexity original -> assembled | "
            "held-out top-1 | served greedy tokens identical |", "|---|---|---|---|---|"]
  for p in result["per_model"]:
    lines.append(f"| {p['model']} | {p['substitutions']} | {p['perplexity_original']:.3f} -> "
                 f"{p['perplexity_assembled']:.3f} | {p['holdout_top1']:.4f} | "
                 f"{p['served_token_agreement']:.1%} |")
  return lines
