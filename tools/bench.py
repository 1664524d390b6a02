"""Multi-tenant benchmark: block serving vs per-model serving vs transformers, side by side.

  python -m tools.bench                       # the default sweep (N in 1,4,8,16; rates to saturation)
  python -m tools.bench --sweep=none --n_variants=4 --rate=2 --duration=10 --base_size=tiny
  python -m tools.bench --sweep=none --base_size=100m --n_variants=8 --rate=0.5   # target scale

Writes OUT/bench_<timestamp>.json (+ latest.json) and a PNG plot (+ latest.png). The logic lives in
jblock.bench; this script only reads flags.
"""

import os
import shutil
import sys
import time

from absl import app, flags, logging

from jblock.bench import report, runner, workload, zoo_setup

_N = flags.DEFINE_integer("n_variants", 8, "Variants served in the rate sweep (and --sweep=none).",
                          lower_bound=1)
_N_SWEEP = flags.DEFINE_list("n_sweep", ["1", "4", "8", "16"], "N values of --sweep=default.")
_ALPHA = flags.DEFINE_float("alpha", 1.0, "Popularity skew: p_i ∝ 1/i^alpha (0 = uniform).",
                            lower_bound=0.0)
_RATE = flags.DEFINE_list("rate", [], "Request rates (req/s) to sweep; empty: multiples "
                          "(--rate_multiples) of the single-stream capacity measured first.")
_RATE_MULTIPLES = flags.DEFINE_list("rate_multiples", ["0.5", "1", "2", "3", "4"],
                                    "Rates as multiples of the single-stream capacity.")
_N_SWEEP_MULTIPLE = flags.DEFINE_float("n_sweep_multiple", 2.0,
                                       "Rate of the N sweep, as a multiple of that capacity.")
_CV = flags.DEFINE_float("cv", 1.0, "Coefficient of variation of inter-arrival gaps (1 = Poisson).")
_DURATION = flags.DEFINE_float("duration", 15.0, "Seconds of arrivals per run.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", None,
                                     "Requests per run (instead of --duration).")
_INPUT_LEN = flags.DEFINE_string("input_len", "16-48", "Prompt tokens: N or LO-HI (uniform).")
_OUTPUT_LEN = flags.DEFINE_string("output_len", "16-48", "Output tokens: N or LO-HI (uniform).")
_MODES = flags.DEFINE_list("modes", list(runner.MODES),
                           "Serving modes: block, per_model, hf (transformers).")
_BASE = flags.DEFINE_enum("base_size", "medium", list(zoo_setup.PRESETS),
                          "Base model preset: tiny (0.1M params), small (8M), medium (34M, "
                          "the default sweep's), 100m (110M, the issue's target scale); "
                          "tiny-{qwen3,gemma2,gemma3,phi3,mixtral}: the tiny size in those families.")
_FRACTION = flags.DEFINE_float("trainable_fraction", 0.25,
                               "Fraction of the decoder layers each variant fine-tunes (top).")
_STEPS = flags.DEFINE_integer("train_steps", 4, "Fine-tuning steps per variant.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "tools/results", "Where the JSON and PNG go.")
_WORK = flags.DEFINE_string("work_dir", "checkpoints/bench",
                            "Models, zoo, compilation cache and server logs (reused).")
_SWEEP = flags.DEFINE_enum("sweep", "default", ["default", "none"],
                           "default: N sweep and rate sweep; none: --n_variants at --rate only.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of models and workload.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Max batch per block (hf: per generate call).",
                              lower_bound=1)
_KV_SLOTS = flags.DEFINE_integer("kv_slots", 16, "KV slots per layers instance.", lower_bound=1)
_SLO_TTFT = flags.DEFINE_float("slo_ttft_s", 0.0, "TTFT SLO; 0: --slo_scale x unloaded TTFT.")
_SLO_E2E = flags.DEFINE_float("slo_e2e_s", 0.0, "Latency SLO; 0: --slo_scale x unloaded latency.")
_SLO_SCALE = flags.DEFINE_float("slo_scale", 5.0, "SLOs as multiples of the unloaded latency.")
_TIMEOUT = flags.DEFINE_float("request_timeout_s", 60.0, "Per-request deadline (then it fails).")
_WARMUP = flags.DEFINE_integer("max_warmup_bursts", 6,
                               "Unrecorded workload bursts per JAX server before measuring, "
                               "until one compiles (almost) nothing new.", lower_bound=0)
_PROVISION = flags.DEFINE_enum(
    "provision", "tenants", ["tenants", "uniform"],
    "Block instance sizes. tenants: a block shared by k served models gets k x batch_size "
    "and k x kv_slots, the per-model baseline's capacity pooled; uniform: all the same.")
_BANDWIDTH_MB = flags.DEFINE_integer("bandwidth_mb", 1024, "Array size (MiB) streamed to "
                                     "measure memory bandwidth; far above the CPU caches.",
                                     lower_bound=1)
_HF_EVERY_N = flags.DEFINE_bool("hf_at_every_n", False, "Run transformers in the N sweep too.")


def _config() -> runner.BenchConfig:
  bad = [m for m in _MODES.value if m not in runner.MODES]
  if bad:
    raise ValueError(f"--modes: unknown {bad}; choose from {list(runner.MODES)}")
  if _SWEEP.value == "default":
    ns = tuple(sorted({int(n) for n in _N_SWEEP.value} | {_N.value}))
  else:
    ns = (_N.value,)
  rates = tuple(float(r) for r in _RATE.value)
  return runner.BenchConfig(
      n_variants=ns, n_main=_N.value, rates=rates,
      rate_multiples=tuple(float(m) for m in _RATE_MULTIPLES.value),
      n_sweep_multiple=_N_SWEEP_MULTIPLE.value, modes=tuple(_MODES.value),
      hf_at_every_n=_HF_EVERY_N.value, alpha=_ALPHA.value, cv=_CV.value,
      duration_s=None if _NUM_REQUESTS.value else _DURATION.value,
      num_requests=_NUM_REQUESTS.value,
      input_len=workload.LengthDist.parse(_INPUT_LEN.value),
      output_len=workload.LengthDist.parse(_OUTPUT_LEN.value), base_size=_BASE.value,
      trainable_fraction=_FRACTION.value, train_steps=_STEPS.value, seed=_SEED.value,
      batch_size=_BATCH.value, kv_slots=_KV_SLOTS.value, slo_ttft_s=_SLO_TTFT.value,
      slo_e2e_s=_SLO_E2E.value, slo_scale=_SLO_SCALE.value,
      request_timeout_s=_TIMEOUT.value, work_dir=_WORK.value,
      max_warmup_bursts=_WARMUP.value, provision=_PROVISION.value,
      bandwidth_mb=_BANDWIDTH_MB.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    cfg = _config()
  except ValueError as e:
    sys.stderr.write(f"bench: error: {e}\n")
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)  # orbax logs every block it restores at INFO
  t0 = time.monotonic()
  stamp = time.strftime("%Y%m%d_%H%M%S")
  json_path = os.path.join(_OUT.value, f"bench_{stamp}.json")
  png_path = os.path.join(_OUT.value, f"bench_{stamp}.png")

  def say(message: str) -> None:
    print(f"[{time.monotonic() - t0:7.1f}s] {message}", flush=True)

  # Partial results are on disk after every run: an interrupted sweep still leaves its data.
  result = runner.run(cfg, say, on_update=lambda r: report.write_json(r, json_path))
  result["plot"] = report.plot(result["runs"], cfg.n_main, png_path)
  report.write_json(result, json_path)
  report.write_json(result, os.path.join(_OUT.value, "latest.json"))
  shutil.copyfile(png_path, os.path.join(_OUT.value, "latest.png"))
  print(report.table(result["runs"]))
  comparison = result["comparison"]
  print(f"\nat N={cfg.n_main}: loaded rate {comparison['loaded_rate']} req/s")
  for name, met in comparison["targets"].items():
    print(f"  {name:<45} {'met' if met else ('not met' if met is not None else 'n/a')}")
  for key in ("p95_e2e_block_over_per_model_at_loaded_rate", "max_throughput_block_over_per_model",
              "resident_bytes_block_over_per_model", "max_throughput_block_over_hf",
              "decode_step_over_roofline"):
    value = comparison[key]
    print(f"  {key:<45} {'-' if value is None else f'{value:.3f}'}")
  for eq in result["equality"]:
    print(f"  greedy outputs {eq['a']} vs {eq['b']} (N={eq['n_variants']}, rate {eq['rate']}): "
          f"{eq['equal']}/{eq['compared']} equal")
  print(f"\nwrote {json_path}, {png_path} and latest.json in {time.monotonic() - t0:.0f}s")


if __name__ == "__main__":
  app.run(main)
