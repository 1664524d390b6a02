"""Closed-batch engine comparison: jblock's Engine vs vLLM's CPU build, side by side.

  make bench-vllm                                   # once: vLLM's own virtual environment
  python -m tools.engine_bench                      # every shape, 3 alternating pairs each
  python -m tools.engine_bench --shapes=mha512 --pairs=1 --vllm_python=   # jblock only

Writes OUT/engine_bench_<timestamp>.json and prints the summary table. The logic lives in
jblock.bench.engine_bench; this script only reads flags.
"""

import os

from absl import app, flags

from jblock.bench import engine_bench, report

_SHAPES = flags.DEFINE_list("shapes", list(engine_bench.SHAPES), "Model shapes to compare.")
_PAIRS = flags.DEFINE_integer("pairs", 3, "Alternating (jblock, vLLM) runs per shape.", lower_bound=1)
_VLLM = flags.DEFINE_string("vllm_python", ".venv-vllm/bin/python",
                            "vLLM's interpreter (make bench-vllm); empty: jblock only.")
_WORK = flags.DEFINE_string("work_dir", "checkpoints/engine_bench", "Checkpoints, caches, logs.")
_OUT = flags.DEFINE_string("out", "tools/results", "Where the JSON goes.")


def main(argv):
  del argv
  for shape in _SHAPES.value:
    if shape not in engine_bench.SHAPES:
      raise app.UsageError(f"--shapes: unknown shape {shape!r} (known: "
                           f"{', '.join(engine_bench.SHAPES)})")
  vllm = _VLLM.value or None
  if vllm and not os.path.exists(vllm):
    raise app.UsageError(f"--vllm_python: {vllm} does not exist; run `make bench-vllm` or pass "
                         "--vllm_python= for jblock only")
  result = engine_bench.run_all(_SHAPES.value, _WORK.value, vllm, _PAIRS.value,
                                progress=lambda m: print(m, flush=True))
  path = report.results_path(_OUT.value, "engine_bench")
  report.write_json(result, path)
  print("\n".join(result["table"]))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
