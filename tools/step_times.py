"""Per-block decode step times on this machine.

  python -m tools.step_times --zoo=checkpoints/zoo --model=base --out=tools/results/step_times.json
"""

from absl import app
from absl import flags

from jblock.bench.results import write_json
from jblock.zoo.cli import quiet_libraries

_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Block zoo directory.")
_MODEL = flags.DEFINE_string("model", None, "Model whose blocks are timed.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8"], "Batch sizes to time.")
_MAX_LEN = flags.DEFINE_integer("max_len", 256, "KV length per slot.", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per point.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "", "JSON results file; empty = print only.")
flags.mark_flag_as_required("model")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_libraries()
  from jblock.runtime.profile import time_block_steps
  from jblock.zoo.store import Zoo
  try:
    sizes = [int(b) for b in _BATCH_SIZES.value]
  except ValueError:
    raise app.UsageError(f"--batch_sizes must be integers, got {_BATCH_SIZES.value}")
  chain = Zoo(_ZOO.value).load_model(_MODEL.value).blocks
  rows = time_block_steps(chain, sizes, max_len=_MAX_LEN.value, repeats=_REPEATS.value)
  print(f"{'kind':<7} {'batch':>5} {'param MB':>9} {'ms/step':>8}")
  for r in rows:
    print(f"{r['kind']:<7} {r['batch']:>5} {r['param_bytes'] / 1e6:>9.2f} {r['median_ms']:>8.3f}")
  write_json(_OUT.value, {"model": _MODEL.value, "zoo": _ZOO.value, "rows": rows})


if __name__ == "__main__":
  app.run(main)
