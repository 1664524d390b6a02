"""What per-row sampling controls cost: decode tok/s with logprobs, penalties or a grammar on
every row, and of plain rows batched with grammar rows, against plain rows, side by side.

  python -m tools.sampling_bench                     # gqa384, 16 rows, 3 alternating pairs
  python -m tools.sampling_bench --shape=125m --pairs=2

Writes OUT/sampling_bench_<timestamp>.json and prints the table. The logic lives in
jblock.bench.sampling_bench; this script only reads flags.
"""

from absl import app, flags

from jblock.bench import engine_bench, report, sampling_bench

_SHAPE = flags.DEFINE_enum("shape", "gqa384", list(engine_bench.SHAPES), "Model shape.")
_ROWS = flags.DEFINE_integer("rows", 16, "Requests in the closed batch.", lower_bound=1)
_NEW = flags.DEFINE_integer("new_tokens", 48, "Tokens generated per request.", lower_bound=1)
_PAIRS = flags.DEFINE_integer("pairs", 3, "Alternating (plain, mode) runs per mode.", lower_bound=1)
_WORK = flags.DEFINE_string("work_dir", "checkpoints/engine_bench", "Checkpoints and caches.")
_OUT = flags.DEFINE_string("out", "tools/results", "Where the JSON goes.")


def main(argv):
  del argv
  job = sampling_bench.Job(shape=_SHAPE.value, rows=_ROWS.value, new_tokens=_NEW.value,
                           pairs=_PAIRS.value)
  result = sampling_bench.run(job, _WORK.value, progress=lambda m: print(m, flush=True))
  path = report.results_path(_OUT.value, "sampling_bench")
  report.write_json(result, path)
  print("\n".join(result["table"]))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
