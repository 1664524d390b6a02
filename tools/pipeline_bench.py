"""Two workers with every chain split over both: serial vs concurrent vs worker-to-worker.

  python -m tools.pipeline_bench [--zoo=checkpoints/zoo] [--streams=16] [--max_new_tokens=32]
                                 [--hop_latency_ms=0,5] [--repeats=3]

For each injected per-hop latency, runs the three designs of jblock.bench.pipeline_bench in
turns at the same load (a warm-up round each, then --repeats rounds each of --streams concurrent
greedy requests) and reports the median round's tokens per second, the share of the round both
workers had a RunBlock in flight, the hidden-state bytes the coordinator handled and the bytes
sent worker to worker, and whether every design gave the serial design's tokens. Writes tools/results/pipeline_bench_<timestamp>.json.
"""

import json

from absl import app, flags

_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Block zoo (the demo zoo is built if empty).")
_STREAMS = flags.DEFINE_integer("streams", 16, "Concurrent requests.", lower_bound=1)
_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens per request.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Measured rounds per design (the median is "
                                "reported).", lower_bound=1)
_LATENCY = flags.DEFINE_list("hop_latency_ms", ["0", "5"], "Injected latency per RPC hop.")
_OUT = flags.DEFINE_string("out", "tools/results", "Where the JSON goes.")


def main(argv):
  del argv
  from jblock.bench import pipeline_bench, report
  result = pipeline_bench.run(_ZOO.value, _STREAMS.value, _NEW.value, _LATENCY.value,
                              _REPEATS.value, progress=lambda row: print(row, flush=True))
  path = report.results_path(_OUT.value, "pipeline_bench")
  report.write_json(result, path)
  print(json.dumps(result, indent=2))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
