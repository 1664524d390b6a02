"""Full fine-tunes as compressed deltas against equivalence assembly and per-model serving.

Material: the Pareto sweep's (jblock.train.pareto): N full fine-tunes of one byte-level Llama
base, at each fine-tuning learning rate asked for, plus optionally one larger base (hidden 512,
8 layers) with fewer fine-tunes. For every material, side by side in one run:
  - each fine-tune converted with every encoding (jblock.zoo.full_deltas: bitdelta with distilled
    scales, int4, int8, auto), and equivalence assembly at the given top-1 budgets;
  - resident param bytes of serving the N together (the base once, each model's whole blocks and
    deltas) over N per-model copies; held-out KL(original ‖ served) and top-1 agreement, on the
    split of the corpus no model trained on (the equivalence harness's held-out windows);
  - on the first material, served throughput and p95 of the N originals per-model against the N
    compressed fine-tunes through the base (one engine each, open at once, rounds alternating,
    the same multi-tenant workload: jblock.bench.serve_bench), and whether their greedy tokens
    equal the materialised models' on every request.
"""

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from jblock.bench import serve_bench
from jblock.convert import full_delta
from jblock.runtime.engine import Engine, EngineConfig
from jblock.train import pareto
from jblock.zoo import assemble as asm
from jblock.zoo.chain_runner import ChainRunner
from jblock.zoo.equivalence import DEFAULT_CALIBRATION, Equivalence
from jblock.zoo.full_deltas import DeltaOptions, convert_full_delta
from jblock.zoo.store import Zoo

METHODS = ("bitdelta", "int4", "int8", "auto")
LARGE = dict(hidden=512, layers=8, heads=8, kv_heads=4, n=4, pretrain_steps=120)


def _held_out(zoo, name: str, m: pareto.Material) -> np.ndarray:
  return Equivalence(zoo, name, DEFAULT_CALIBRATION, seq_len=m.seq_len, max_windows=64,
                     holdout=m.holdout).calibration.holdout


def _materialised(zoo, name: str) -> dict[int, Any]:
  manifest = zoo.manifest(name)
  return {p: full_delta.materialize(zoo.load_block(manifest["chain"][p]), zoo.load_block(d))
          for p, d in enumerate(manifest["deltas"]) if d}


def _footprint(zoo, name: str, base_chain: Sequence[str]) -> int:
  """Param bytes a delta model adds to the base: its own whole blocks and its deltas."""
  manifest = zoo.manifest(name)
  own = {i for i in manifest["chain"] if i not in base_chain}
  return sum(int(zoo.block_record(i)["nbytes"]) for i in own) + sum(manifest["delta_bytes"])


def compress_all(zoo, work_dir: str, names: Sequence[str], m: pareto.Material,
                 methods: Sequence[str], say: Callable[[str], None]) -> list[dict[str, Any]]:
  """One row per encoding: bytes and held-out losses over the N fine-tunes."""
  base_chain = zoo.manifest("base")["chain"]
  base_bytes = sum(zoo.manifest("base")["block_bytes"])
  per_model_bytes = sum(sum(zoo.manifest(n)["block_bytes"]) for n in names)
  runners = {n: ChainRunner([zoo.load_block(i) for i in zoo.manifest(n)["chain"]],
                            _held_out(zoo, n, m)) for n in names}
  rows = []
  for method in methods:
    start = time.monotonic()
    models = []
    for i, n in enumerate(names):
      name = f"{n}-{method}"
      convert_full_delta(zoo, os.path.join(work_dir, f"variant_{i + 1}"), "base", name,
                         DeltaOptions(method=method), overwrite=True)
      held = runners[n].measure(_materialised(zoo, name))
      record = zoo.manifest(name)["full_delta"]
      models.append({"model": n, "served": name, "bytes": _footprint(zoo, name, base_chain),
                     "held_out": {"kl": held["kl"], "top1": held["top1"]},
                     "encodings": record["encodings"], "distill": record.get("distill")})
    resident = base_bytes + sum(r["bytes"] for r in models)
    row = {"method": method, "resident_bytes": resident, "per_model_bytes": per_model_bytes,
           "resident_ratio": resident / per_model_bytes,
           "holdout_kl_mean": float(np.mean([r["held_out"]["kl"] for r in models])),
           "holdout_kl_max": float(np.max([r["held_out"]["kl"] for r in models])),
           "holdout_top1_mean": float(np.mean([r["held_out"]["top1"] for r in models])),
           "holdout_top1_min": float(np.min([r["held_out"]["top1"] for r in models])),
           "models": models, "seconds": time.monotonic() - start}
    rows.append(row)
    say(f"{method:9s} resident {row['resident_ratio']:.3f}x per-model, held-out KL "
        f"{row['holdout_kl_mean']:.5f} (max {row['holdout_kl_max']:.5f}), top-1 "
        f"{row['holdout_top1_mean']:.4f} (min {row['holdout_top1_min']:.4f}), "
        f"{row['seconds']:.0f} s")
  return rows


def assembly_rows(zoo, names, m: pareto.Material, min_top1: Sequence[float], say) -> list[dict]:
  budgets = [asm.Budget(min_top1=t) for t in min_top1]
  rows = pareto.sweep(zoo, names, budgets, m, say)["rows"]
  return [{k: r[k] for k in ("label", "resident_ratio", "holdout_kl_mean", "holdout_kl_max",
                             "holdout_top1_mean", "holdout_top1_min", "within_budget")}
          for r in rows]


def serve_side_by_side(zoo, names, method: str, m: pareto.Material, rounds: int, per_tenant: int,
                       new_tokens: int, prompt_len: int, say) -> dict[str, Any]:
  """The N originals per-model against the N compressed fine-tunes, rounds alternating."""
  compressed = [f"{n}-{method}" for n in names]
  modes = {"per_model": list(names), "compressed": compressed}
  # Equal capacity: per-model serving has a batch of 8 rows and KV for `per_tenant` requests
  # per model; the N compressed fine-tunes share one chain with N times both. Prefix caching is
  # off in both: prompts are cut from a small held-out tail, so which prompts hit a cached
  # prefix (and compile a prefix-hit shape) would differ between rounds.
  def config(models: int) -> EngineConfig:
    return EngineConfig(batch_size=8 * models, kv_slots=per_tenant * models,
                        max_seq_len=prompt_len + new_tokens + 16, prefill_chunk=prompt_len,
                        length_buckets=(prompt_len,), lora_slots=len(names),
                        enable_prefix_caching=False)
  engines = {mode: Engine.from_zoo(zoo.root, models, mesh_shape=(1, 1),
                                   config=config(1 if mode == "per_model" else len(names)))
             for mode, models in modes.items()}
  out: dict[str, Any] = {"rounds": []}
  served = {mode: [] for mode in modes}
  try:
    resident = {mode: e.stats()["resident_bytes"] + e.stats()["adapters"]["bank_bytes"]
                for mode, e in engines.items()}
    for w in range(2):  # unmeasured: mixed batches reach shapes warm-up does not compile
      jobs = serve_bench.workload(len(names), per_tenant, prompt_len, m.holdout, seed=1000 + w)
      for mode, e in engines.items():
        serve_bench.timed_round(e, modes[mode], jobs, new_tokens)
    for r in range(rounds):
      jobs = serve_bench.workload(len(names), per_tenant, prompt_len, m.holdout, seed=r)
      for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
        res = serve_bench.timed_round(engines[mode], modes[mode], jobs, new_tokens)
        served[mode].append((jobs, res["tokens"]))
        out["rounds"].append({"mode": mode, "latency_s": res["latency_s"], "wall_s": res["wall_s"],
                              "generated": res["generated"]})
        say(f"round {r} {mode:10s} {res['generated'] / res['wall_s']:.1f} tok/s, p95 "
            f"{np.percentile(res['latency_s'], 95):.3f} s")
  finally:
    for e in engines.values():
      e.close()
  summary = {}
  for mode in modes:
    rs = [r for r in out["rounds"] if r["mode"] == mode]
    summary[mode] = {
        "resident_bytes_incl_bank": int(resident[mode]),
        "tok_per_s": sum(r["generated"] for r in rs) / sum(r["wall_s"] for r in rs),
        "median_round_tok_per_s": float(np.median([r["generated"] / r["wall_s"] for r in rs])),
        "p95_s": float(np.percentile([x for r in rs for x in r["latency_s"]], 95)),
        "median_round_p95_s": float(np.median([np.percentile(r["latency_s"], 95) for r in rs]))}
  summary["ratios_compressed_over_per_model"] = {
      k: summary["compressed"][k] / summary["per_model"][k] for k in summary["per_model"]}
  same = total = 0
  for (jobs, a), (_, b) in zip(served["per_model"], served["compressed"]):
    for x, y in zip(a, b):
      same += sum(int(p == q) for p, q in zip(x, y))
      total += len(x)
  summary["greedy_token_agreement_with_originals"] = same / max(1, total)
  out["summary"] = summary
  return out


def run(work_dir: str, lrs: Sequence[float] = (1e-4, 5e-4), n: int = 8,
        methods: Sequence[str] = METHODS, assembly_top1: Sequence[float] = (0.99, 0.97),
        large: bool = True, rounds: int = 6, per_tenant: int = 8, new_tokens: int = 32,
        prompt_len: int = 32, say=print,
        on_material: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
  """Every material in turn; `on_material(result so far)` after each (a long run keeps what
  it has measured)."""
  materials = [(f"lr{lr:g}", pareto.Material(n=n, finetune_lr=lr)) for lr in lrs]
  if large:
    materials.append((f"large_lr{lrs[0]:g}", dataclasses.replace(
        pareto.Material(finetune_lr=lrs[0]), **LARGE)))
  out: dict[str, Any] = {"materials": {}}
  for i, (label, m) in enumerate(materials):
    say(f"== {label}: {m.n} full fine-tunes of a {m.layers}-layer hidden-{m.hidden} base, "
        f"lr {m.finetune_lr:g}")
    work = os.path.join(work_dir, label)
    os.makedirs(work, exist_ok=True)
    zoo = Zoo(os.path.join(work, "zoo"))
    names = pareto.build_zoo(zoo, work, m, say)
    entry = {"material": pareto.material_dict(m),
             "compressed": compress_all(zoo, work, names, m, methods, say),
             "assembly": assembly_rows(zoo, names, m, assembly_top1, say) if assembly_top1 else []}
    if i == 0 and rounds:
      entry["serving"] = serve_side_by_side(zoo, names, "auto" if "auto" in methods else methods[0],
                                            m, rounds, per_tenant, new_tokens, prompt_len, say)
    out["materials"][label] = entry
    if on_material:
      on_material(out)
  return out


def table_lines(result: dict[str, Any]) -> list[str]:
  lines = []
  for label, entry in result["materials"].items():
    lines.append(f"{label}: resident / per-model, held-out KL mean (max), top-1 mean (min)")
    for r in entry["assembly"]:
      lines.append(f"  assembly {r['label']:<10} {r['resident_ratio']:.3f}x  KL "
                   f"{r['holdout_kl_mean']:.5f} ({r['holdout_kl_max']:.5f})  top-1 "
                   f"{r['holdout_top1_mean']:.4f} ({r['holdout_top1_min']:.4f})")
    for r in entry["compressed"]:
      lines.append(f"  delta    {r['method']:<10} {r['resident_ratio']:.3f}x  KL "
                   f"{r['holdout_kl_mean']:.5f} ({r['holdout_kl_max']:.5f})  top-1 "
                   f"{r['holdout_top1_mean']:.4f} ({r['holdout_top1_min']:.4f})")
    if "serving" in entry:
      s = entry["serving"]["summary"]
      ratio = s["ratios_compressed_over_per_model"]
      lines.append(f"  serving: per-model {s['per_model']['tok_per_s']:.1f} tok/s p95 "
                   f"{s['per_model']['p95_s']:.3f} s; compressed {s['compressed']['tok_per_s']:.1f}"
                   f" tok/s p95 {s['compressed']['p95_s']:.3f} s; ratios tok/s "
                   f"{ratio['tok_per_s']:.2f}x p95 {ratio['p95_s']:.2f}x resident "
                   f"{ratio['resident_bytes_incl_bank']:.3f}x")
  return lines


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = list(result["materials"])
  fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
  for ax, label in zip(axes[0], labels):
    entry = result["materials"][label]
    a = entry["assembly"]
    ax.plot([r["resident_ratio"] for r in a], [r["holdout_top1_mean"] for r in a], "o--",
            label="equivalence assembly")
    for r in entry["compressed"]:
      ax.plot(r["resident_ratio"], r["holdout_top1_mean"], "s", label=f"delta {r['method']}")
    ax.set_xlabel("resident bytes / per-model")
    ax.set_ylabel("held-out top-1 agreement")
    ax.set_title(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
