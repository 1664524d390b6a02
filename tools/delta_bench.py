"""Full fine-tunes as compressed delta blocks: bytes, held-out losses and serving, side by side
with equivalence assembly and per-model serving.

  python -m tools.delta_bench                     # lr 1e-4 and 5e-4, 8 fine-tunes, + a larger base
  python -m tools.delta_bench --lrs=1e-4 --n=4 --nolarge --rounds=2

Builds (once, into --work_dir) the Pareto sweep's base and full fine-tunes per learning rate,
converts each with every encoding, assembles each at the given budgets, serves the first
material's fine-tunes per-model and compressed, and writes the JSON and a plot. The logic lives
in jblock.bench.delta_bench.
"""

import datetime
import os
import time

from absl import app, flags

from jblock.bench import delta_bench, results
from jblock.zoo import cli

_WORK = flags.DEFINE_string("work_dir", "/tmp/jblock_delta_bench",
                            "Where the checkpoints and zoos are made (reused when present).")
_LRS = flags.DEFINE_list("lrs", ["1e-4", "5e-4"], "Fine-tuning learning rates (one material each).")
_N = flags.DEFINE_integer("n", 8, "Full fine-tunes per material.", lower_bound=1)
_LARGE = flags.DEFINE_bool("large", True, "Also a larger base (hidden 512, 8 layers, 4 fine-tunes).")
_METHODS = flags.DEFINE_list("methods", list(delta_bench.METHODS), "Delta encodings to compare.")
_TOP1 = flags.DEFINE_list("assembly_min_top1", ["0.99", "0.97"],
                          "Equivalence assembly budgets to put beside them (empty: none).")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Measured serving rounds (0: no serving).",
                               lower_bound=0)
_OUT = flags.DEFINE_string("out", None, "JSON results (default tools/results/delta_bench_<time>."
                           "json); the plot is written next to it as .png.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for m in _METHODS.value:
    if m not in delta_bench.METHODS:
      raise app.UsageError(f"--methods: {m!r} is not one of {', '.join(delta_bench.METHODS)}")
  try:
    lrs = [float(x) for x in _LRS.value]
    top1 = [float(x) for x in _TOP1.value]
  except ValueError as e:
    raise app.UsageError(f"--lrs / --assembly_min_top1: {e}") from None
  cli.quiet_libraries()
  say = cli.progress_printer()
  start = time.monotonic()
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
  out = _OUT.value or os.path.join("tools", "results", f"delta_bench_{stamp}.json")

  def save(partial):
    results.write_json(out, {"seconds": time.monotonic() - start, "complete": False, **partial})
    say(f"partial results: {out}")

  result = delta_bench.run(_WORK.value, lrs=lrs, n=_N.value, methods=_METHODS.value,
                           assembly_top1=top1, large=_LARGE.value, rounds=_ROUNDS.value, say=say,
                           on_material=save)
  results.write_json(out, {"seconds": time.monotonic() - start, "complete": True, **result})
  delta_bench.plot(result, os.path.splitext(out)[0] + ".png")
  print("\n".join(delta_bench.table_lines(result)))
  print(f"results: {out} (plot {os.path.splitext(out)[0]}.png)")


if __name__ == "__main__":
  app.run(main)
