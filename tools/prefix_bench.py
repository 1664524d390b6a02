"""Prefix caching, on vs off in one run (jblock.bench.prefix_bench).

  python -m tools.prefix_bench [--preset=small-long] [--variants=8] [--system_tokens=1024]
                               [--burst=32] [--work_dir=/tmp/jblock_bench]

Builds (once, under --work_dir) a base and N partial fine-tunes of its top quarter of layers in
one zoo, then measures with two engines over them, caching on and off: TTFT of a cached vs a
new system prompt, KV pages held for the prompt across the N models vs one copy per model,
prompt FLOPs and tok/s of a burst over all models behind one prompt, and decode tok/s with
nothing to reuse. Writes tools/results/prefix_bench_<timestamp>.json.
"""

import json

from absl import app, flags

_WORK = flags.DEFINE_string("work_dir", "/tmp/jblock_bench", "Where the models and zoo are built.")
_PRESET = flags.DEFINE_string("preset", "small-long", "Base size (jblock.bench.zoo_setup.PRESETS).")
_VARIANTS = flags.DEFINE_integer("variants", 8, "Partial fine-tunes served.", lower_bound=1)
_SYSTEM = flags.DEFINE_integer("system_tokens", 1024, "System prompt length.", lower_bound=16)
_SUFFIX = flags.DEFINE_integer("suffix_tokens", 32, "Each request's own prompt tokens.",
                               lower_bound=1)
_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens each burst request generates.",
                            lower_bound=1)
_BURST = flags.DEFINE_integer("burst", 32, "Requests of the burst.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("ttft_rounds", 5, "TTFT rounds (the median is reported).",
                               lower_bound=1)
_DECODE_ROUNDS = flags.DEFINE_integer("decode_rounds", 5, "Decode rounds per setting, in turns "
                                     "(the median is reported).", lower_bound=1)
_OUT = flags.DEFINE_string("out", "tools/results", "Where the JSON goes.")


def main(argv):
  del argv
  from jblock.bench import prefix_bench, report
  cfg = prefix_bench.PrefixBenchConfig(
      preset=_PRESET.value, variants=_VARIANTS.value, system_tokens=_SYSTEM.value,
      suffix_tokens=_SUFFIX.value, new_tokens=_NEW.value, burst=_BURST.value,
      ttft_rounds=_ROUNDS.value, decode_rounds=_DECODE_ROUNDS.value)
  result = prefix_bench.run(_WORK.value, cfg, say=lambda line: print(line, flush=True))
  path = report.results_path(_OUT.value, "prefix_bench")
  report.write_json(result, path)
  print(json.dumps(result, indent=2))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
