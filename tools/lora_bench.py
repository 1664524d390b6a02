"""Throughput vs number of LoRA adapters of one base (N = 0 base only, 1, 4, 16, 64, 256).

  python -m tools.lora_bench [--counts=0,1,4,16,64,256] [--requests=64] [--repeats=2]

Each repeat runs jblock over every N, then vLLM over every N, so repeats alternate the two
(ratios are read within one repeat). Writes OUT/lora_bench_<timestamp>.json (every repeat's
rows), a throughput-vs-N plot beside it (.png, with matplotlib) and prints a Markdown table per
repeat. The logic lives in jblock.bench.lora_bench; this script only reads flags.
"""

import dataclasses
import os

from absl import app, flags

from jblock.bench import lora_bench, report

_COUNTS = flags.DEFINE_list("counts", ["0", "1", "4", "16", "64", "256"], "Adapter counts to run.")
_REHEARSE = flags.DEFINE_bool("rehearse", False, "No engine warm-up: one untimed round first.")
_TIMED = flags.DEFINE_integer("timed_runs", 1, "Timed rounds, each running every N in turn "
                              "(the fastest round of each N counts).", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 2, "Passes (jblock then vLLM each).", lower_bound=1)
_REQUESTS = flags.DEFINE_integer("requests", 64, "Requests per run.", lower_bound=1)
_SLOTS = flags.DEFINE_integer("slots", 64, "Bank slots (resident adapters).", lower_bound=1)
_WORK = flags.DEFINE_string("work_dir", "checkpoints/lora_bench", "Base, adapters and zoo.")
_OUT = flags.DEFINE_string("out", "tools/results", "Where the JSON goes.")
_VLLM = flags.DEFINE_string("vllm_python", ".venv-vllm/bin/python",
                            "vLLM's interpreter (make bench-vllm); empty: jblock only.")


def main(argv):
  del argv
  spec = dataclasses.replace(lora_bench.LoraBenchSpec(), counts=tuple(int(c) for c in _COUNTS.value),
                             requests=_REQUESTS.value, slots=_SLOTS.value,
                             rehearse=_REHEARSE.value, timed_runs=_TIMED.value)
  vllm = _VLLM.value if _VLLM.value and os.path.exists(_VLLM.value) else None
  passes = [lora_bench.run(spec, _WORK.value, vllm_python=vllm) for _ in range(_REPEATS.value)]
  path = report.results_path(_OUT.value, "lora_bench")
  report.write_json({"spec": dataclasses.asdict(spec), "rows": passes[-1], "passes": passes}, path)
  for i, rows in enumerate(passes):
    print(f"pass {i + 1}:")
    print(lora_bench.table(rows))
  print(f"wrote {path}")
  try:
    print(f"wrote {lora_bench.plot(passes, path[:-len('.json')] + '.png')}")
  except ImportError:
    print("no plot: matplotlib is not installed")


if __name__ == "__main__":
  app.run(main)
