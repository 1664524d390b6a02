"""The benchmark: seeded workloads, and a smoke run of the whole tool on tiny models."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jblock.bench import report, workload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_workload_is_seeded_and_follows_its_distributions():
  spec = workload.WorkloadSpec(n_variants=4, rate=50.0, alpha=1.0, cv=2.0, duration_s=None,
                               num_requests=4000, input_len=workload.LengthDist.parse("8-16"),
                               output_len=workload.LengthDist.parse("5"), vocab_size=100, seed=3)
  requests = workload.build(spec)
  assert requests == workload.build(spec)  # same seed, same requests
  assert requests != workload.build(workload.WorkloadSpec(**{**spec.__dict__, "seed": 4}))
  gaps = np.diff([0.0] + [r.arrival_s for r in requests])
  assert abs(gaps.mean() - 1 / 50) < 0.1 / 50  # mean gap 1/rate
  assert abs(gaps.std() / gaps.mean() - 2.0) < 0.2  # coefficient of variation
  counts = np.bincount([r.variant for r in requests], minlength=4) / len(requests)
  np.testing.assert_allclose(counts, workload.popularity(4, 1.0), atol=0.03)
  assert {len(r.prompt_tokens) for r in requests} == set(range(8, 17))
  assert {r.max_new_tokens for r in requests} == {5}
  assert all(0 <= t < 100 for r in requests for t in r.prompt_tokens)


def test_duration_bounds_arrivals_and_lengths_parse():
  requests = workload.build(workload.WorkloadSpec(n_variants=2, rate=10.0, duration_s=5.0))
  assert requests and all(r.arrival_s < 5.0 for r in requests)
  assert workload.LengthDist.parse("32") == workload.LengthDist(32, 32)
  assert workload.LengthDist.parse("16:64") == workload.LengthDist(16, 64)
  for bad in ("0", "9-3", "x"):
    with pytest.raises(ValueError):
      workload.LengthDist.parse(bad)
  np.testing.assert_allclose(workload.popularity(3, 0.0), [1 / 3] * 3)


def test_bench_smoke_run(tmp_path):
  """Three server processes (block, per_model, transformers) over real gRPC, a few requests."""
  out = tmp_path / "results"
  proc = subprocess.run(
      [sys.executable, "-m", "tools.bench", "--sweep=none", "--base_size=tiny", "--n_variants=2",
       "--rate=20", "--num_requests=6", "--input_len=4-12", "--output_len=3-6",
       "--train_steps=1", "--max_warmup_bursts=1", "--bandwidth_mb=64",
       f"--out={out}", f"--work_dir={tmp_path / 'work'}"],
      cwd=REPO, capture_output=True, text=True, timeout=500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "latest.json") as f:
    result = json.load(f)
  assert (out / "latest.png").stat().st_size > 0
  assert {r["mode"] for r in result["runs"]} == {"block", "per_model", "hf"}
  for run in result["runs"]:
    m = run["metrics"]
    assert m["requests"] == 6 and m["ok"] == 6, m["errors"]
    for key in ("ttft_s", "tpot_s", "e2e_s"):
      assert set(m[key]) == {"p50", "p95", "p99", "mean"} and m[key]["p50"] > 0
    assert m["output_tokens_per_s"] > 0 and m["requests_per_s"] > 0
    assert 0 <= m["slo"]["attainment"] <= 1
    assert run["server"]["resident_bytes"] > 0 and run["server"]["peak_rss_bytes"] > 0
    assert len(run["requests"]) == 6
  runs = {r["mode"]: r for r in result["runs"]}
  # Partial fine-tunes share most blocks: the block engine holds fewer weight bytes.
  assert runs["block"]["server"]["resident_bytes"] < runs["per_model"]["server"]["resident_bytes"]
  # Greedy outputs do not depend on whether blocks are shared.
  block_tokens = [r["tokens"] for r in runs["block"]["requests"]]
  assert block_tokens == [r["tokens"] for r in runs["per_model"]["requests"]]
  equality = [e for e in result["equality"] if e["b"] == "per_model"]
  assert equality and equality[0]["equal"] == equality[0]["compared"] == 6
  roof = result["roofline"]
  assert roof["bandwidth_gb_s"] > 0 and roof["roofline_step_s"] > 0
  assert roof["measured"]["decode_step_s"] > 0
  comparison = result["comparison"]
  assert set(comparison["targets"]) == {
      "p95 block <= 0.5x per_model at a loaded rate", "throughput block >= 1.5x per_model",
      "resident bytes block <= 0.35x per_model", "throughput block >= 2x transformers",
      "batch-1 decode <= 1.5x roofline"}
  assert "mode" in report.table(result["runs"])


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "phi3", "mixtral"])
def test_family_presets_convert_with_the_params_they_count(family, tmp_path):
  from jblock.train import variants
  from jblock.bench import zoo_setup
  from jblock.zoo.store import Zoo
  spec = zoo_setup.PRESETS[f"tiny-{family}"]
  assert (spec.family, spec.hidden, spec.layers) == (family, 64, 4)
  base = variants.init_base(spec, str(tmp_path / "base"))
  report = Zoo(str(tmp_path / "zoo")).convert(base, "base")
  assert report.model_bytes == 4 * zoo_setup.param_count(spec)  # float32
  assert len(report.chain) == 1 + spec.layers + 1
