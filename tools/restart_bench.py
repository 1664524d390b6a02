"""Coordinator SIGKILL and restart under load: lost requests, seconds to serve again, blocks
reloaded on the workers.

  python -m tools.restart_bench [--zoo=checkpoints/zoo] [--streams=16] [--max_new_tokens=48]

Builds the demo zoo into --zoo if it holds no models. Writes OUT/restart_bench_<timestamp>.json
and prints it. The logic lives in jblock.bench.restart_bench; this script only reads flags.
"""

import json
import os

from absl import app, flags

from jblock.bench import report, restart_bench

_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Block zoo (the demo zoo is built if empty).")
_MODELS = flags.DEFINE_list("models", [], "Models to serve; empty = all of the zoo's.")
_STREAMS = flags.DEFINE_integer("streams", 16, "Concurrent requests at the kill.", lower_bound=1)
_NEW = flags.DEFINE_integer("max_new_tokens", 48, "Tokens per request.", lower_bound=2)
_ENGINE_FLAGS = flags.DEFINE_list("engine_flags", [], "Extra launch.coordinator flags, e.g. "
                                  "--batch_size=16 (comma-separated).")
_OUT = flags.DEFINE_string("out", "tools/results", "Where the JSON goes.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jblock.train import demo
  from jblock.zoo.store import Zoo
  demo.build_demo_zoo(_ZOO.value)
  models = _MODELS.value or Zoo(_ZOO.value).models()
  os.makedirs(_OUT.value, exist_ok=True)
  path = report.results_path(_OUT.value, "restart_bench")
  result = restart_bench.run(_ZOO.value, models, _STREAMS.value, _NEW.value, _ENGINE_FLAGS.value,
                             log_path=path.removesuffix(".json") + ".log")
  report.write_json(result, path)
  print(json.dumps(result, indent=2))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
