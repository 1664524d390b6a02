"""Pareto sweep of adaptive assembly over N full fine-tunes: bytes saved vs measured loss.

  python -m tools.equiv_bench                       # 8 full fine-tunes, the default budgets
  python -m tools.equiv_bench --min_top1=0.99,0.97 --max_kl= --n=4
  python -m tools.equiv_bench --mode=overload        # rerouting under one tenant's burst
  python -m tools.equiv_bench --mode=serve --finetune_lr=1e-4   # N originals vs N assembled

Builds (once, into --work_dir) a byte-level Llama base pre-trained on the demo corpus minus
its held-out tail and N full fine-tunes of it (every tensor trained on its own corpus section,
as `tools.make_variants --full` trains them), converts them into a zoo, assembles every variant
from the base's blocks at every budget, and writes the table, JSON and plot. The logic lives in
jblock.train.pareto; --mode=overload runs jblock.bench.reroute_bench instead; --mode=serve runs
jblock.bench.serve_bench (the same material, assembled at --serve_min_top1, served through the
engine once as the N originals and once as the N assembled models, side by side).
"""

import datetime
import os
import time

from absl import app, flags

from jblock.bench import results
from jblock.train import pareto
from jblock.zoo import cli
from jblock.zoo.store import Zoo

_MODE = flags.DEFINE_enum("mode", "pareto", ["pareto", "overload", "serve"],
                          "pareto: the assembly sweep; overload: p95 per tenant with and without "
                          "on-the-fly rerouting while one tenant's private blocks are overloaded; "
                          "serve: the N fine-tunes served per-model vs assembled.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "overload, serve: measured rounds (alternating modes).",
                               lower_bound=1)
_SERVE_TOP1 = flags.DEFINE_float("serve_min_top1", 0.97, "serve: the assembly's top-1 budget.",
                                 lower_bound=0.0, upper_bound=1.0)
_PER_TENANT = flags.DEFINE_integer("per_tenant", 4, "serve: requests per model per round.",
                                   lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 16, "serve: tokens generated per request.",
                                   lower_bound=1)
_BURST = flags.DEFINE_integer("burst", 12, "overload: concurrent requests of the loaded tenant.",
                              lower_bound=1)
_WORK = flags.DEFINE_string("work_dir", "/tmp/jblock_equiv_bench",
                            "Where the checkpoints and the zoo are made (reused when present).")
_N = flags.DEFINE_integer("n", 8, "Full fine-tunes of the base.", lower_bound=1)
_MIN_TOP1 = flags.DEFINE_list("min_top1", ["0.999", "0.99", "0.98", "0.97", "0.95", "0.9", "0.8"],
                              "Top-1 agreement budgets.")
_MAX_KL = flags.DEFINE_list("max_kl", ["0.001", "0.003", "0.01", "0.03", "0.1"], "KL budgets.")
_FT_LR = flags.DEFINE_float("finetune_lr", pareto.Material.finetune_lr, "Fine-tuning learning rate.")
_FT_STEPS = flags.DEFINE_integer("finetune_steps", pareto.Material.finetune_steps,
                                 "Fine-tuning steps per variant.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "JSON results (default tools/results/equiv_bench_<time>.json); "
                           "the plot is written next to it as .png.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_libraries()
  say = cli.progress_printer()
  start = time.monotonic()
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
  if _MODE.value == "overload":
    from jblock.bench import reroute_bench
    work = os.path.join(_WORK.value, "overload")
    os.makedirs(work, exist_ok=True)
    result = reroute_bench.run(work, rounds=_ROUNDS.value, burst=_BURST.value, say=say)
    out = _OUT.value or os.path.join("tools", "results", f"reroute_bench_{stamp}.json")
    results.write_json(out, {"seconds": time.monotonic() - start, **result})
    for mode in ("per_model", "rerouted"):
      print(f"{mode:9s} " + "  ".join(f"{t} p50 {v['p50']:.3f}s p95 {v['p95']:.3f}s"
                                      for t, v in sorted(result["summary"][mode].items())))
    print("p95 rerouted / per-model:", {t: round(v, 3) for t, v in
                                         result["summary"]["p95_ratio_rerouted_over_per_model"].items()})
    print(f"results: {out}")
    return
  if _MODE.value == "serve":
    from jblock.bench import serve_bench
    from jblock.zoo.assemble import Budget
    result = serve_bench.run(_WORK.value, n=_N.value, budget=Budget(min_top1=_SERVE_TOP1.value),
                             finetune_lr=_FT_LR.value, finetune_steps=_FT_STEPS.value,
                             per_tenant=_PER_TENANT.value, new_tokens=_NEW_TOKENS.value,
                             rounds=_ROUNDS.value, say=say)
    out = _OUT.value or os.path.join("tools", "results", f"serve_bench_{stamp}.json")
    results.write_json(out, {"seconds": time.monotonic() - start, **result})
    print("\n".join(serve_bench.table_lines(result)))
    print(f"results: {out}")
    return
  material = pareto.Material(n=_N.value, finetune_lr=_FT_LR.value, finetune_steps=_FT_STEPS.value)
  os.makedirs(_WORK.value, exist_ok=True)
  zoo = Zoo(os.path.join(_WORK.value, "zoo"))
  names = pareto.build_zoo(zoo, _WORK.value, material, say)
  budgets = pareto.budgets(_MIN_TOP1.value, _MAX_KL.value)
  result = pareto.sweep(zoo, names, budgets, material, say)
  out = _OUT.value or os.path.join("tools", "results", f"equiv_bench_{stamp}.json")
  results.write_json(out, {"material": pareto.material_dict(material), "models": names,
                           "seconds": time.monotonic() - start, **result})
  pareto.plot(result, os.path.splitext(out)[0] + ".png")
  print("\n".join(pareto.table_lines(result)))
  base = result["whole_base"]
  print(f"whole base (every block substituted): held-out KL "
        f"{sum(m['kl'] for m in base.values()) / len(base):.4f}, top-1 "
        f"{sum(m['top1'] for m in base.values()) / len(base):.4f}")
  print(f"results: {out} (plot {os.path.splitext(out)[0]}.png)")


if __name__ == "__main__":
  app.run(main)
