"""The Pareto sweep of adaptive assembly: bytes saved vs measured loss as the budget varies.

Material: N full fine-tunes (every tensor trained) of one small base, made offline like
`tools.make_variants --full`: a byte-level Llama base pre-trained on the first part of the demo
corpus, each variant fine-tuned on its own section of that part; the corpus's tail is held out
(no model trained on it). Each variant is assembled from the base's blocks at every budget;
the held-out split of the calibration text is the tail, so every figure is on unseen text.
"""

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

import numpy as np

from jblock.convert.hf import convert, export
from jblock.train import variants
from jblock.train.finetune import TrainConfig, train
from jblock.zoo import assemble as asm
from jblock.zoo.equivalence import DEFAULT_CALIBRATION, HOLDOUT, Equivalence


@dataclasses.dataclass(frozen=True)
class Material:
  """Sizes and schedule of the base and its full fine-tunes."""
  n: int = 8
  hidden: int = 64
  layers: int = 6
  heads: int = 4
  kv_heads: int = 2
  pretrain_steps: int = 200
  pretrain_lr: float = 5e-3
  finetune_steps: int = 30
  finetune_lr: float = 5e-4
  batch_size: int = 16
  seq_len: int = 64
  holdout: float = 0.15  # tail of the corpus no model trains on (the held-out split)
  seed: int = 0


def corpus_tokens(path: str = DEFAULT_CALIBRATION) -> np.ndarray:
  with open(path, encoding="utf-8") as f:
    return np.frombuffer(f.read().encode("utf-8"), np.uint8).astype(np.int32)


def training_part(tokens: np.ndarray, holdout: float) -> np.ndarray:
  """The part before the held-out tail, cut exactly where calibration.make_calibration cuts."""
  return tokens[:tokens.size - int(round(tokens.size * holdout))]


def build_zoo(zoo, work_dir: str, m: Material, say: Callable[[str], None]) -> list[str]:
  """Base and N full fine-tunes into the zoo as 'base', 'full-1'..'full-N'; returns the names."""
  names = [f"full-{i}" for i in range(1, m.n + 1)]
  stamp = os.path.join(work_dir, "material.json")
  try:
    with open(stamp) as f:
      same = json.load(f) == material_dict(m)
  except (OSError, ValueError):
    same = False
  if same and all(n in zoo.models() for n in ["base", *names]):
    say(f"zoo {zoo.root} already holds base and {m.n} full fine-tunes made this way")
    return names
  if os.path.isdir(zoo.root):
    shutil.rmtree(zoo.root)  # made with other settings: start over
  data = training_part(corpus_tokens(), m.holdout)
  base_dir = os.path.join(work_dir, "base")
  spec = variants.BaseSpec(family="llama", hidden=m.hidden, layers=m.layers, heads=m.heads,
                           kv_heads=m.kv_heads, vocab=257, max_positions=256)
  variants.init_base(spec, base_dir, seed=m.seed)
  model = convert(base_dir, "float32", layers_per_block=1)
  say(f"pre-training the base ({m.layers} layers, hidden {m.hidden}, byte vocabulary) for "
      f"{m.pretrain_steps} steps on {data.size} bytes of the demo corpus")
  cfg = TrainConfig(steps=m.pretrain_steps, batch_size=m.batch_size, seq_len=m.seq_len,
                    lr=m.pretrain_lr, seed=m.seed, warmup=10, cosine=True)
  result = train(model.blocks, data, cfg, full=True, progress=say)
  export(model.config, model.hf_config, result.blocks, base_dir)
  say(f"base: loss {result.loss_start:.3f} -> {result.loss_end:.3f}")
  dirs = variants.make_variants(base_dir, work_dir, m.n, steps=m.finetune_steps, seed=m.seed,
                                full=True, data=data, lr=m.finetune_lr, batch_size=m.batch_size,
                                seq_len=m.seq_len, progress=say)
  zoo.convert(base_dir, "base", overwrite=True)
  for name, d in zip(names, dirs):
    zoo.convert(d, name, lineage={"base_model": "base"}, overwrite=True)
  say(f"converted base and {m.n} full fine-tunes into {zoo.root}")
  with open(stamp, "w") as f:
    json.dump(material_dict(m), f, indent=2)
  return names


def budgets(min_top1: Sequence[float], max_kl: Sequence[float]) -> list[asm.Budget]:
  return ([asm.Budget(min_top1=float(t)) for t in min_top1]
          + [asm.Budget(max_kl=float(k)) for k in max_kl])


def _label(b: asm.Budget) -> str:
  return f"top1>={b.min_top1:g}" if b.max_kl is None else f"kl<={b.max_kl:g}"


def _model_name(model: str, b: asm.Budget) -> str:
  return f"{model}.top1-{b.min_top1:g}" if b.max_kl is None else f"{model}.kl-{b.max_kl:g}"


def sweep(zoo, names: Sequence[str], budget_list: Sequence[asm.Budget], m: Material,
          say: Callable[[str], None]) -> dict[str, Any]:
  """Assembles every model at every budget; the table rows and the models' divergence from the
  base (everything substituted)."""
  options = dict(seq_len=m.seq_len, max_windows=64, holdout=m.holdout)
  eqs = {n: Equivalence(zoo, n, DEFAULT_CALIBRATION, **options) for n in names}
  model_bytes = {n: sum(zoo.manifest(n)["block_bytes"]) for n in names}
  whole_base = {}
  for n, eq in eqs.items():
    base_chain = zoo.manifest("base")["chain"]
    whole_base[n] = eq.measure({p: base_chain[p] for p in eq.positions()}, HOLDOUT)
  rows = []
  for b in budget_list:
    start = time.monotonic()
    per_model = []
    for n in names:
      out = asm.assemble(zoo, n, _model_name(n, b), max_kl=b.max_kl,
                         min_top1=b.min_top1, calibration=eqs[n].calibration, overwrite=True)
      per_model.append({"model": n, "assembled": out["name"],
                        "substitutions": [s["position"] for s in out["substitutions"]],
                        "bytes_saved": out["bytes_saved"], "model_bytes": out["model_bytes"],
                        "holdout": out["holdout"], "fit": out["fit"],
                        "dropped_on_holdout": [d["position"] for d in out["dropped_on_holdout"]],
                        "chain": zoo.manifest(out["name"])["chain"]})
    resident = _resident_bytes(zoo, [r["chain"] for r in per_model])
    per_model_bytes = sum(model_bytes.values())
    held = [r["holdout"] for r in per_model]
    row = {
        "budget": b.to_dict(), "label": _label(b),
        "mean_substitutions": float(np.mean([len(r["substitutions"]) for r in per_model])),
        "bytes_saved": sum(r["bytes_saved"] for r in per_model),
        "saved_fraction": sum(r["bytes_saved"] for r in per_model) / per_model_bytes,
        "resident_bytes": resident, "per_model_bytes": per_model_bytes,
        "resident_ratio": resident / per_model_bytes,
        "holdout_kl_mean": float(np.mean([h["kl"] for h in held])),
        "holdout_kl_max": float(np.max([h["kl"] for h in held])),
        "holdout_top1_mean": float(np.mean([h["top1"] for h in held])),
        "holdout_top1_min": float(np.min([h["top1"] for h in held])),
        "perplexity_mean": float(np.mean([h["perplexity"] for h in held])),
        "perplexity_original_mean": float(np.mean([h["perplexity_original"] for h in held])),
        "within_budget": all(b.ok(h) for h in held),
        "models": per_model, "seconds": time.monotonic() - start,
    }
    rows.append(row)
    say(f"{row['label']:<12} substitutions {row['mean_substitutions']:.1f}/model, saved "
        f"{row['saved_fraction']:.1%}, resident {row['resident_ratio']:.2f}x per-model, held-out "
        f"KL {row['holdout_kl_mean']:.4f} top-1 {row['holdout_top1_mean']:.4f}, perplexity "
        f"{row['perplexity_mean']:.3f} vs {row['perplexity_original_mean']:.3f} "
        f"({row['seconds']:.1f} s)")
  return {"rows": rows, "whole_base": whole_base,
          "resident_bytes_base_plus_originals": _resident_bytes(
              zoo, [zoo.manifest(n)["chain"] for n in ["base", *names]])}


def _resident_bytes(zoo, chains: Sequence[Sequence[str]]) -> int:
  """Param bytes of the distinct blocks the chains reference: what serving them together holds."""
  ids = {i for c in chains for i in c}
  return sum(int(zoo.block_record(i)["nbytes"]) for i in ids)


def table_lines(result: dict[str, Any]) -> list[str]:
  lines = ["| budget | substitutions / model | bytes saved | resident vs per-model | held-out KL "
           "mean (max) | held-out top-1 mean (min) | perplexity assembled vs original |",
           "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['label']} | {r['mean_substitutions']:.1f} | {r['saved_fraction']:.1%} | "
                 f"{r['resident_ratio']:.2f}x | {r['holdout_kl_mean']:.4f} "
                 f"({r['holdout_kl_max']:.4f}) | {r['holdout_top1_mean']:.4f} "
                 f"({r['holdout_top1_min']:.4f}) | {r['perplexity_mean']:.3f} vs "
                 f"{r['perplexity_original_mean']:.3f} |")
  return lines


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  series = {"min_top1": [r for r in result["rows"] if r["budget"]["max_kl"] is None],
            "max_kl": [r for r in result["rows"] if r["budget"]["max_kl"] is not None]}
  base = list(result["whole_base"].values())
  base_kl = float(np.mean([m["kl"] for m in base]))
  base_top1 = float(np.mean([m["top1"] for m in base]))
  for label, rows in series.items():
    if not rows:
      continue
    saved = [100 * r["saved_fraction"] for r in rows]
    axes[0].plot([r["holdout_kl_mean"] for r in rows], saved, "o-", label=f"budget {label}")
    axes[1].plot([1 - r["holdout_top1_mean"] for r in rows], saved, "o-", label=f"budget {label}")
    for n, (r, s) in enumerate(zip(rows, saved)):
      if n and r["mean_substitutions"] == rows[n - 1]["mean_substitutions"] == 0:
        continue  # budgets that substituted nothing all sit at the origin
      axes[1].annotate(r["label"], (1 - r["holdout_top1_mean"], s), fontsize=7,
                       xytext=(3, 3), textcoords="offset points")
  full = 100.0  # every block substituted: each model is the base, nothing of its own resident
  axes[0].plot([base_kl], [full], "k*", label="whole base (every block)")
  axes[1].plot([1 - base_top1], [full], "k*", label="whole base (every block)")
  axes[0].set(xlabel="measured held-out KL(original || assembled), mean", ylabel="bytes saved (%)",
              title="bytes saved vs measured loss")
  axes[0].set_xscale("symlog", linthresh=1e-3)
  axes[1].set(xlabel="1 - held-out top-1 agreement, mean", ylabel="bytes saved (%)",
              title="bytes saved vs top-1 disagreement")
  rows = result["rows"]
  x = np.arange(len(rows))
  axes[2].bar(x - 0.2, [r["perplexity_original_mean"] for r in rows], 0.4, label="original")
  axes[2].bar(x + 0.2, [r["perplexity_mean"] for r in rows], 0.4, label="assembled")
  axes[2].set_xticks(x, [r["label"] for r in rows], rotation=45, ha="right", fontsize=7)
  axes[2].set(ylabel="held-out perplexity (mean over models)", title="perplexity on held-out text")
  low = min(min(r["perplexity_mean"], r["perplexity_original_mean"]) for r in rows)
  high = max(max(r["perplexity_mean"], r["perplexity_original_mean"]) for r in rows)
  axes[2].set_ylim(low - 0.15 * (high - low + 0.1), high + 0.15 * (high - low + 0.1))
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def material_dict(m: Material) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(m)))
