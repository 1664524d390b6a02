"""Metrics of benchmark runs, the block-vs-baseline comparisons, a text table, a plot, results files."""

import json
import os
import socket
import time
from typing import Sequence

import numpy as np

from jblock.bench.driver import RunResult


def _pcts(values: Sequence[float]) -> dict:
  if not values:
    return {"p50": None, "p95": None, "p99": None, "mean": None}
  arr = np.asarray(values, np.float64)
  return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
          "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def run_metrics(run: RunResult, slo_ttft_s: float, slo_e2e_s: float) -> dict:
  """Latency percentiles over finished requests; throughput over the run's wall time; SLO
  attainment over all requests (a failed or unfinished request misses its SLO)."""
  ok = [r for r in run.results if r.ok]
  n = len(run.results)
  tokens = sum(len(r.tokens) for r in ok)
  errors: dict[str, int] = {}
  for r in run.results:
    if not r.ok:
      code = (r.error or "NO_TOKENS").split(":")[0]
      errors[code] = errors.get(code, 0) + 1
  ttft_met = sum(r.ttft_s <= slo_ttft_s for r in ok)
  e2e_met = sum(r.latency_s <= slo_e2e_s for r in ok)
  both_met = sum(r.ttft_s <= slo_ttft_s and r.latency_s <= slo_e2e_s for r in ok)
  return {
      "requests": n, "ok": len(ok), "errors": errors,
      "offered_rate": run.offered_rate, "wall_s": run.wall_s,
      "ttft_s": _pcts([r.ttft_s for r in ok]),
      "tpot_s": _pcts([r.tpot_s for r in ok if r.tpot_s is not None]),
      "e2e_s": _pcts([r.latency_s for r in ok]),
      "output_tokens": tokens,
      "output_tokens_per_s": tokens / run.wall_s if run.wall_s > 0 else 0.0,
      "requests_per_s": len(ok) / run.wall_s if run.wall_s > 0 else 0.0,
      "slo": {"ttft_s": slo_ttft_s, "e2e_s": slo_e2e_s,
              "ttft_attainment": ttft_met / n if n else 0.0,
              "e2e_attainment": e2e_met / n if n else 0.0,
              "attainment": both_met / n if n else 0.0},
      "max_send_lag_s": max((r.send_lag_s for r in run.results), default=0.0),
  }


def output_equality(a: RunResult, b: RunResult) -> dict:
  """Greedy outputs of the same requests in two runs: how many are token-for-token equal."""
  pairs = [(x, y) for x, y in zip(a.results, b.results) if x.ok and y.ok]
  equal = sum(x.tokens == y.tokens for x, y in pairs)
  first_diff = next((x.index for x, y in pairs if x.tokens != y.tokens), None)
  return {"compared": len(pairs), "equal": equal,
          "fraction": equal / len(pairs) if pairs else None, "first_different_request": first_diff}


def _get(runs, mode, n, rate):
  return next((r for r in runs if r["mode"] == mode and r["n_variants"] == n
               and r["rate"] == rate), None)


def _ratio(a, b):
  return a / b if a is not None and b not in (None, 0) else None


def compare(runs: list[dict], n_main: int, roofline: dict | None) -> dict:
  """The targets, each as a ratio measured side by side in this run.

  Loaded rates (the p95 target's condition): swept rates at which per-model serving's p95 is at
  least twice its p95 at the lowest swept rate (its unloaded latency, as near as the sweep
  gets), and at which the block engine still completed every request at ≥ 80% of the offered
  request rate (past that both queue for as long as the run lasts and p95 mostly measures the
  run's length). The p95 ratio reported is the worst (largest) over the loaded rates.
  """
  rates = sorted({r["rate"] for r in runs if r["n_variants"] == n_main and r["mode"] == "block"})
  per_rate = []
  loaded_rows = []
  lowest = _get(runs, "per_model", n_main, rates[0]) if rates else None
  unloaded_p95 = lowest["metrics"]["e2e_s"]["p95"] if lowest else None
  for rate in rates:
    block = _get(runs, "block", n_main, rate)
    row = {"rate": rate}
    for other in ("per_model", "hf"):
      o = _get(runs, other, n_main, rate)
      if o:
        row[f"p95_e2e_block_over_{other}"] = _ratio(block["metrics"]["e2e_s"]["p95"],
                                                    o["metrics"]["e2e_s"]["p95"])
        row[f"throughput_block_over_{other}"] = _ratio(block["metrics"]["output_tokens_per_s"],
                                                       o["metrics"]["output_tokens_per_s"])
    per_rate.append(row)
    m = block["metrics"]
    per_model = _get(runs, "per_model", n_main, rate)
    per_model_loaded = (per_model is not None and unloaded_p95 is not None and
                        per_model["metrics"]["e2e_s"]["p95"] >= 2 * unloaded_p95)
    if (per_model_loaded and m["requests_per_s"] >= 0.8 * m["offered_rate"]
        and m["ok"] == m["requests"]):
      loaded_rows.append(row)
  loaded = max(loaded_rows, key=lambda r: r["p95_e2e_block_over_per_model"], default=None)

  def best_throughput(mode):
    values = [r["metrics"]["output_tokens_per_s"] for r in runs
              if r["mode"] == mode and r["n_variants"] == n_main]
    return max(values) if values else None

  def resident(mode):
    for r in runs:
      if r["mode"] == mode and r["n_variants"] == n_main and r.get("server"):
        return r["server"].get("resident_bytes")
    return None

  out = {
      "n_variants": n_main,
      "per_rate": per_rate,
      "per_model_unloaded_p95_s": unloaded_p95,
      "loaded_rates": [r["rate"] for r in loaded_rows],
      "loaded_rate": loaded["rate"] if loaded else None,  # where the p95 ratio is worst
      "p95_e2e_block_over_per_model_at_loaded_rate":
          loaded.get("p95_e2e_block_over_per_model") if loaded else None,
      "max_throughput_block_over_per_model": _ratio(best_throughput("block"),
                                                    best_throughput("per_model")),
      "max_throughput_block_over_hf": _ratio(best_throughput("block"), best_throughput("hf")),
      "resident_bytes_block_over_per_model": _ratio(resident("block"), resident("per_model")),
      "decode_step_over_roofline": roofline.get("measured_over_roofline") if roofline else None,
  }
  out["targets"] = {
      "p95 block <= 0.5x per_model at a loaded rate":
          _meets(out["p95_e2e_block_over_per_model_at_loaded_rate"], 0.5, below=True),
      "throughput block >= 1.5x per_model": _meets(out["max_throughput_block_over_per_model"], 1.5),
      "resident bytes block <= 0.35x per_model":
          _meets(out["resident_bytes_block_over_per_model"], 0.35, below=True),
      "throughput block >= 2x transformers": _meets(out["max_throughput_block_over_hf"], 2.0),
      "batch-1 decode <= 1.5x roofline": _meets(out["decode_step_over_roofline"], 1.5, below=True),
  }
  return out


def _meets(value, bound, below=False):
  if value is None:
    return None
  return bool(value <= bound) if below else bool(value >= bound)


def _fmt(value, scale=1.0, digits=3):
  return "-" if value is None else f"{value * scale:.{digits}g}"


def _ms(seconds):
  if seconds is None:
    return "-"
  ms = seconds * 1e3
  return f"{ms:.1f}" if ms < 10 else f"{ms:.0f}"


def table(runs: list[dict]) -> str:
  """One line per run: the numbers a reader compares across modes."""
  head = (f"{'mode':<9} {'N':>3} {'rate':>6} {'ok/req':>8} {'ttft50':>7} {'ttft95':>7} "
          f"{'tpot50':>7} {'e2e50':>7} {'e2e95':>7} {'e2e99':>7} {'tok/s':>7} {'req/s':>6} "
          f"{'slo':>5} {'weightsMB':>9} {'peakMB':>7}")
  lines = [head, "(latencies in ms; slo = fraction meeting both TTFT and e2e SLOs)"]
  for r in sorted(runs, key=lambda r: (r["n_variants"], r["rate"], r["mode"])):
    m, s = r["metrics"], r.get("server") or {}
    lines.append(
        f"{r['mode']:<9} {r['n_variants']:>3} {r['rate']:>6.3g} {m['ok']:>3}/{m['requests']:<4} "
        f"{_ms(m['ttft_s']['p50']):>7} {_ms(m['ttft_s']['p95']):>7} "
        f"{_ms(m['tpot_s']['p50']):>7} {_ms(m['e2e_s']['p50']):>7} "
        f"{_ms(m['e2e_s']['p95']):>7} {_ms(m['e2e_s']['p99']):>7} "
        f"{m['output_tokens_per_s']:>7.1f} {m['requests_per_s']:>6.2f} "
        f"{m['slo']['attainment']:>5.2f} {_fmt(s.get('resident_bytes'), 1e-6, 4):>9} "
        f"{_fmt(s.get('peak_rss_bytes'), 1e-6, 4):>7}")
  return "\n".join(lines)


def plot(runs: list[dict], n_main: int, path: str) -> str:
  """p95 latency and throughput vs rate (at N = n_main) and vs N (at the N-sweep's rate)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  modes = [m for m in ("block", "per_model", "hf") if any(r["mode"] == m for r in runs)]
  rate_runs = [r for r in runs if r["n_variants"] == n_main]
  n_runs = [r for r in runs if r.get("n_sweep")]
  with_n = len({r["n_variants"] for r in n_runs}) > 1
  fig, axes = plt.subplots(2 if with_n else 1, 3, figsize=(15, 8 if with_n else 4), squeeze=False)
  panels = [
      (axes[0][0], rate_runs, "rate", lambda r: r["metrics"]["e2e_s"]["p95"],
       f"p95 end-to-end latency (s), N={n_main}", "offered rate (req/s)"),
      (axes[0][1], rate_runs, "rate", lambda r: r["metrics"]["output_tokens_per_s"],
       f"output tokens/s, N={n_main}", "offered rate (req/s)"),
      (axes[0][2], rate_runs, "rate", lambda r: r["metrics"]["slo"]["attainment"],
       f"SLO attainment, N={n_main}", "offered rate (req/s)"),
  ]
  if with_n:
    rate = n_runs[0]["rate"]
    panels += [
        (axes[1][0], n_runs, "n_variants", lambda r: r["metrics"]["e2e_s"]["p95"],
         f"p95 end-to-end latency (s) vs N, {rate:g} req/s", "variants N"),
        (axes[1][1], n_runs, "n_variants", lambda r: r["metrics"]["output_tokens_per_s"],
         f"output tokens/s vs N, {rate:g} req/s", "variants N"),
        (axes[1][2], n_runs, "n_variants",
         lambda r: (r.get("server") or {}).get("resident_bytes"), "resident weight bytes vs N",
         "variants N"),
    ]
  for ax, subset, key, value, title, xlabel in panels:
    for mode in modes:
      points = sorted((r[key], value(r)) for r in subset if r["mode"] == mode
                      and value(r) is not None)
      if points:
        ax.plot(*zip(*points), marker="o", label=mode)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def results_path(out_dir: str, name: str) -> str:
  """`out_dir/name_YYYYmmdd_HHMMSS.json`: one file per run, never overwriting an earlier one."""
  return os.path.join(out_dir, f"{name}_{time.strftime('%Y%m%d_%H%M%S')}.json")


def free_loopback_port() -> int:
  """A port free on 127.0.0.1 now (for a bench's coordinator or registry)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def write_json(result: dict, path: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)
