"""Throughput vs number of LoRA adapters of one base (N = 0 base only, 1, 4, 16, 64).

  python -m tools.lora_bench [--counts=0,1,4,16,64] [--requests=64] [--work_dir=...]

Writes OUT/lora_bench_<timestamp>.json and prints a Markdown table. The logic lives in
jblock.bench.lora_bench; this script only reads flags.
"""

import dataclasses
import json
import os
import time

from absl import app, flags

from jblock.bench import lora_bench

_COUNTS = flags.DEFINE_list("counts", ["0", "1", "4", "16", "64"], "Adapter counts to run.")
_REQUESTS = flags.DEFINE_integer("requests", 64, "Requests per run.", lower_bound=1)
_SLOTS = flags.DEFINE_integer("slots", 16, "Bank slots (resident adapters).", lower_bound=1)
_WORK = flags.DEFINE_string("work_dir", "checkpoints/lora_bench", "Base, adapters and zoo.")
_OUT = flags.DEFINE_string("out", "tools/results", "Where the JSON goes.")
_VLLM = flags.DEFINE_string("vllm_python", ".venv-vllm/bin/python",
                            "vLLM's interpreter (make bench-vllm); empty: jblock only.")


def main(argv):
  del argv
  spec = dataclasses.replace(lora_bench.LoraBenchSpec(), counts=tuple(int(c) for c in _COUNTS.value),
                             requests=_REQUESTS.value, slots=_SLOTS.value)
  vllm = _VLLM.value if _VLLM.value and os.path.exists(_VLLM.value) else None
  rows = lora_bench.run(spec, _WORK.value, vllm_python=vllm)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, f"lora_bench_{time.strftime('%Y%m%d_%H%M%S')}.json")
  with open(path, "w") as f:
    json.dump({"spec": dataclasses.asdict(spec), "rows": rows}, f, indent=2, default=str)
  print(lora_bench.table(rows))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
