"""gRPC round-trip overhead vs in-process engine calls (same engine, alternating requests).

  python -m tools.grpc_overhead --zoo=checkpoints/zoo --model=base --out=tools/results/grpc_overhead.json
"""

import json

from absl import app
from absl import flags

from jblock.bench.results import write_json
from jblock.zoo.cli import quiet_libraries

_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Block zoo directory.")
_MODEL = flags.DEFINE_string("model", None, "Model to query.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 8, "Prompt tokens.", lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Generated tokens per request.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Requests per path.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "", "JSON results file; empty = print only.")
flags.mark_flag_as_required("model")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_libraries()
  from jblock.runtime.engine import Engine, EngineConfig
  from jblock.serving.overhead import measure
  engine = Engine.from_zoo(_ZOO.value, [_MODEL.value], mesh_shape=(1, 1),
                           config=EngineConfig(batch_size=1, kv_slots=2))
  try:
    result = measure(engine, _MODEL.value, list(range(1, _PROMPT_LEN.value + 1)),
                     _NEW_TOKENS.value, _ROUNDS.value)
  finally:
    engine.close()
  print(json.dumps(result, indent=2))
  write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
