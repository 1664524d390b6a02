"""Worker SIGKILL under load: lost/failed requests, outputs vs undisturbed, recovery time.

  python -m tools.fault_bench [--zoo=checkpoints/zoo] [--streams=32] [--max_new_tokens=32] [--fault=kill|stop]

Builds the demo zoo into --zoo if it holds no models. Writes OUT/fault_bench_<fault>_<timestamp>.json
and prints it. The logic lives in jblock.bench.fault_bench; this script only reads flags.
"""

import dataclasses
import json
import os

from absl import app, flags

from jblock.bench import fault_bench, report

_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Block zoo (the demo zoo is built if empty).")
_MODELS = flags.DEFINE_list("models", [], "Models to serve; empty = all of the zoo's.")
_STREAMS = flags.DEFINE_integer("streams", 32, "Concurrent requests.", lower_bound=1)
_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens per request.", lower_bound=2)
_KILL_AFTER = flags.DEFINE_integer("kill_after_tokens", 4, "Tokens every stream has at the kill.",
                                   lower_bound=1)
_FAULT = flags.DEFINE_enum("fault", "kill", ["kill", "stop"],
                           "kill: SIGKILL the worker; stop: SIGSTOP it (a hung worker: only its "
                           "missing heartbeats tell).")
_OUT = flags.DEFINE_string("out", "tools/results", "Where the JSON goes.")


def main(argv):
  del argv
  from jblock.train import demo
  from jblock.zoo.store import Zoo
  if not os.path.isdir(_ZOO.value) or not Zoo(_ZOO.value).models():
    demo.build_demo_zoo(_ZOO.value)
  models = _MODELS.value or Zoo(_ZOO.value).models()
  if _KILL_AFTER.value >= _NEW.value:
    raise app.UsageError("--kill_after_tokens must be below --max_new_tokens")
  spec = dataclasses.replace(fault_bench.FaultBenchSpec(), streams=_STREAMS.value,
                             max_new_tokens=_NEW.value, kill_after_tokens=_KILL_AFTER.value,
                             fault=_FAULT.value)
  result = fault_bench.run(spec, _ZOO.value, models, report.free_loopback_port())
  path = report.results_path(_OUT.value, f"fault_bench_{_FAULT.value}")
  report.write_json(result, path)
  print(json.dumps(result, indent=2))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
