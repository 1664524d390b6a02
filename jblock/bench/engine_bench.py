"""Closed-batch engine comparison: jblock's Engine vs vLLM's LLM, in process, side by side.

Both serve the same Hugging Face checkpoint (random weights, float32) with the same prompts of
token ids, greedy. Runs alternate (jblock, vLLM, jblock, vLLM, ...) so that both see the same
machine; every pair gives a ratio. Beside the timings: XLA's cost analysis of jblock's decode
step (bytes accessed vs the bytes of weights + live KV it must read) and the batch-1 roofline.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from jblock.bench.roofline import memory_bandwidth
from jblock.blocks import EMBED, LAYERS
from jblock.convert import convert
from jblock.runtime.engine import Engine, EngineConfig, ModelSpec
from jblock.runtime.kv import pages_for
from jblock.runtime.segments import local_segment_fn
from jblock.runtime.step import StepMeta
from jblock.train import variants

SHAPES = {
    # The shape of the comparison that opened the engine core work (MHA).
    "mha512": variants.BaseSpec(family="llama", hidden=512, layers=8, heads=8, vocab=8192,
                                max_positions=512),
    # Grouped-query attention: 6 query heads share 2 KV heads.
    "gqa384": variants.BaseSpec(family="llama", hidden=384, layers=6, heads=6, kv_heads=2,
                                vocab=8192, max_positions=512),
    # ~125M parameters (GPT-2-small scale, Llama layout): 12 layers, hidden 768, vocab 32000.
    "125m": variants.BaseSpec(family="llama", hidden=768, layers=12, heads=12, vocab=32000,
                              intermediate=2048, max_positions=1024),
}


@dataclasses.dataclass(frozen=True)
class Job:
  shape: str
  num_prompts: int = 64  # closed batch size
  min_len: int = 16  # prompt lengths uniform in [min_len, max_len]
  max_len: int = 48
  new_tokens: int = 32  # generated per prompt
  decode_tokens: int = 32  # batch-1 timing: (time of 1 + M tokens - time of 1) / M
  pairs: int = 3  # alternating (jblock, vLLM) runs
  seed: int = 0

  def prompts(self, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(self.seed)
    return [rng.integers(0, vocab, int(rng.integers(self.min_len, self.max_len + 1))).tolist()
            for _ in range(self.num_prompts)]


def checkpoint(work_dir: str, shape: str) -> str:
  path = os.path.join(work_dir, shape)
  if not os.path.exists(os.path.join(path, "config.json")):
    variants.init_base(SHAPES[shape], path, seed=0)
  return path


def engine_config(job: Job, cache_dir: str | None) -> EngineConfig:
  return EngineConfig(batch_size=job.num_prompts, kv_slots=job.num_prompts, max_seq_len=128,
                      prefill_chunk=64, length_buckets=(16, 32, 64), warmup=True,
                      compilation_cache_dir=cache_dir)


def run_jblock(engine: Engine, prompts, job: Job) -> dict[str, Any]:
  t0 = time.perf_counter()
  handles = [engine.submit("m", p, max_new_tokens=job.new_tokens) for p in prompts]
  outputs = [h.result(600) for h in handles]
  wall = time.perf_counter() - t0

  def timed(n):
    t = time.perf_counter()
    engine.submit("m", prompts[0], max_new_tokens=n).result(600)
    return time.perf_counter() - t

  t_one, t_many = timed(1), timed(1 + job.decode_tokens)
  return {"wall_s": wall, "tokens": sum(map(len, outputs)), "outputs": outputs,
          "batch1_ms": 1e3 * (t_many - t_one) / job.decode_tokens}


class VLLMProcess:
  """vLLM's LLM in its own virtual environment (tools/vllm/run_vllm.py), driven line by line."""

  def __init__(self, python: str, model_dir: str, prompts, job: Job, job_file: str, log):
    with open(job_file, "w") as f:
      json.dump({"prompts": prompts, "max_tokens": job.new_tokens,
                 "decode_tokens": job.decode_tokens}, f)
    script = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "vllm", "run_vllm.py")
    self._proc = subprocess.Popen([python, os.path.abspath(script), f"--model={model_dir}",
                                   f"--prompts={job_file}"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
    self._read_until("READY")

  def _read_until(self, marker: str) -> str:
    for line in self._proc.stdout:
      if line.startswith(marker):
        return line[len(marker):].strip()
    raise RuntimeError(f"vLLM exited (code {self._proc.wait()}) before {marker}; see its log")

  def run(self) -> dict[str, Any]:
    self._proc.stdin.write("run\n")
    self._proc.stdin.flush()
    return json.loads(self._read_until("RESULT"))

  def close(self) -> None:
    try:
      self._proc.stdin.close()
      self._proc.wait(60)
    except Exception:
      self._proc.kill()


def fusion_gain(engine: Engine, converted, prompts, job: Job, work_dir: str) -> dict[str, Any]:
  """The same closed batch with every block its own call (fuse_segments=False), alternated
  with the fused engine: what running a chain as one jitted call gains."""
  cfg = dataclasses.replace(engine_config(job, os.path.join(work_dir, "xla_cache")),
                            fuse_segments=False)
  unfused = Engine([ModelSpec("m", converted.config, converted.blocks)], mesh_shape=(1, 1),
                   config=cfg)
  try:
    run_jblock(unfused, prompts, job)  # warm-up
    fused_runs, unfused_runs = [], []
    for _ in range(2):
      fused_runs.append(run_jblock(engine, prompts, job))
      unfused_runs.append(run_jblock(unfused, prompts, job))
  finally:
    unfused.close()
  tok_s = lambda runs: float(np.median([r["tokens"] / r["wall_s"] for r in runs]))
  ms = lambda runs: float(np.median([r["batch1_ms"] for r in runs]))
  return {"fused_tok_s": tok_s(fused_runs), "unfused_tok_s": tok_s(unfused_runs),
          "fused_batch1_ms": ms(fused_runs), "unfused_batch1_ms": ms(unfused_runs),
          "same_tokens": all(a["outputs"] == b["outputs"] for a, b in zip(fused_runs, unfused_runs))}


def decode_cost(engine: Engine, batch: int, context: int) -> dict[str, Any]:
  """XLA cost analysis of one decode step of the model's fused segment at `batch` rows of
  `context` cached tokens, beside the bytes it must read: weights + live KV."""
  seg = engine._segments["m"][0]
  cfg = engine._scheduler.config
  width = next(w for w in cfg.width_buckets() if w >= pages_for(context + 1, cfg.page_size))
  meta = StepMeta.empty(batch, len(seg.layers), width)
  meta.starts[:] = context
  meta.n_valid[:] = 1
  ints, floats = meta.pack()
  fn = local_segment_fn(seg)
  args = ([i.run_params for i in seg.instances], [i.kv for i in seg.layers],
          np.zeros((batch, 1), np.int32), ints, floats)
  cost = _cost(fn, args)
  # XLA counts a gather's whole operand as accessed: the whole page pool, however few pages the
  # step reads. The same step over a pool of exactly the batch's pages shows what it moves.
  fitted = [{name: jax.ShapeDtypeStruct((a.shape[0], batch * width) + a.shape[2:], a.dtype,
                                        sharding=a.sharding) for name, a in kv.items()}
            for kv in args[1]]
  fitted_cost = _cost(fn, (args[0], fitted) + args[2:])
  weights = sum(i.resident_bytes for i in seg.instances if i.kind != EMBED)
  kv = sum(2 * c["num_layers"] * c["num_kv_heads"] * c["head_dim"] * batch * (context + 1)
           * np.dtype(i.dtype).itemsize for i in seg.layers for c in [i.config])
  accessed = float(cost.get("bytes accessed", 0.0))
  fitted_accessed = float(fitted_cost.get("bytes accessed", 0.0))
  return {"batch": batch, "context": context, "page_width": width,
          "flops": float(cost.get("flops", 0.0)), "bytes_accessed": accessed,
          "bytes_accessed_pool_fitted": fitted_accessed, "weight_bytes": weights,
          "live_kv_bytes": int(kv), "accessed_over_needed": accessed / (weights + kv),
          "fitted_over_needed": fitted_accessed / (weights + kv)}


def _cost(fn, args) -> dict:
  cost = fn.lower(*args).compile().cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def compare(job: Job, work_dir: str, vllm_python: str | None, progress: Callable = print
            ) -> dict[str, Any]:
  """Runs one shape: jblock and (if vllm_python) vLLM alternately; returns the report."""
  model_dir = checkpoint(work_dir, job.shape)
  converted = convert(model_dir)
  prompts = job.prompts(converted.config.vocab_size)
  progress(f"[{job.shape}] jblock: building and compiling the engine")
  t0 = time.perf_counter()
  engine = Engine([ModelSpec("m", converted.config, converted.blocks)], mesh_shape=(1, 1),
                  config=engine_config(job, os.path.join(work_dir, "xla_cache")))
  report: dict[str, Any] = {"job": dataclasses.asdict(job), "spec": dataclasses.asdict(SHAPES[job.shape]),
                            "jblock_startup_s": time.perf_counter() - t0, "pairs": []}
  vllm = None
  try:
    run_jblock(engine, prompts, job)  # warm-up run: any shape the warm-up did not compile
    if vllm_python:
      progress(f"[{job.shape}] vLLM: starting")
      log = open(os.path.join(work_dir, f"vllm_{job.shape}.log"), "w")
      vllm = VLLMProcess(vllm_python, model_dir, prompts, job,
                         os.path.join(work_dir, f"job_{job.shape}.json"), log)
    for i in range(job.pairs):
      ours = run_jblock(engine, prompts, job)
      pair = {"jblock_tok_s": ours["tokens"] / ours["wall_s"], "jblock_batch1_ms": ours["batch1_ms"]}
      if vllm is not None:
        theirs = vllm.run()
        pair.update(vllm_tok_s=theirs["tokens"] / theirs["wall_s"], vllm_batch1_ms=theirs["batch1_ms"],
                    greedy_equal=sum(a == b for a, b in zip(ours["outputs"], theirs["outputs"])))
        pair["throughput_ratio"] = pair["jblock_tok_s"] / pair["vllm_tok_s"]
        pair["batch1_ratio"] = pair["jblock_batch1_ms"] / pair["vllm_batch1_ms"]
      report["pairs"].append(pair)
      progress(f"[{job.shape}] pair {i + 1}/{job.pairs}: " +
               ", ".join(f"{k}={v:.3g}" for k, v in pair.items()))
    report["fusion"] = fusion_gain(engine, converted, prompts, job, work_dir)
    progress(f"[{job.shape}] fused vs one call per block: {report['fusion']}")
    context = (job.min_len + job.max_len) // 2 + job.new_tokens // 2
    report["decode_cost"] = [decode_cost(engine, b, context) for b in (1, job.num_prompts)]
    report["segments"] = engine.stats()["segments"]
  finally:
    if vllm is not None:
      vllm.close()
    engine.close()
  return report


def long_context_step(work_dir: str, shape: str = "mha512", rows: int = 16, repeats: int = 3,
                      progress: Callable = print) -> dict[str, Any]:
  """Decode steps of short (16-token) contexts under max_seq_len 128 and 2048: median device
  time of the decode batches (from the engine trace), alternating the two engines."""
  converted = convert(checkpoint(work_dir, shape))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, converted.config.vocab_size, 8).tolist() for _ in range(rows)]
  engines = {}
  for max_len in (128, 2048):
    progress(f"[{shape}] max_seq_len={max_len}: compiling")
    cfg = EngineConfig(batch_size=rows, kv_slots=rows, max_seq_len=max_len, prefill_chunk=16,
                       length_buckets=(16,), warmup=False,
                       compilation_cache_dir=os.path.join(work_dir, "xla_cache"))
    engines[max_len] = Engine([ModelSpec("m", converted.config, converted.blocks)],
                              mesh_shape=(1, 1), config=cfg)
  steps = {128: [], 2048: []}
  try:
    for rep in range(repeats + 1):  # the first round compiles what it meets: not counted
      for max_len, engine in engines.items():
        n0 = len(engine.trace())
        for h in [engine.submit("m", p, max_new_tokens=8) for p in prompts]:
          h.result(600)
        if rep == 0:
          continue
        steps[max_len] += [t["done"] - t["dispatched"] for t in engine.trace()[n0:]
                           if t["length"] == 1 and t["items"] == rows]
    kv = {m: e.stats()["kv_bytes"] for m, e in engines.items()}
  finally:
    for e in engines.values():
      e.close()
  ms = {m: 1e3 * float(np.median(v)) for m, v in steps.items()}
  return {"shape": shape, "rows": rows, "context": 16, "decode_step_ms": ms,
          "ratio_2048_over_128": ms[2048] / ms[128], "kv_bytes": kv}


def roofline(report: dict[str, Any], bandwidth: float) -> dict[str, Any]:
  """Batch-1 decode step vs (weight + KV bytes of that step) / bandwidth."""
  cost = next(c for c in report["decode_cost"] if c["batch"] == 1)
  limit_ms = 1e3 * (cost["weight_bytes"] + cost["live_kv_bytes"]) / bandwidth
  measured = float(np.median([p["jblock_batch1_ms"] for p in report["pairs"]]))
  return {"bandwidth_bytes_per_s": bandwidth, "roofline_ms": limit_ms, "measured_ms": measured,
          "over_roofline": measured / limit_ms}


def summary_rows(reports: list[dict[str, Any]]) -> list[str]:
  rows = ["| shape | jblock tok/s | vLLM tok/s | ratio (per pair) | jblock batch-1 ms | vLLM batch-1 ms "
          "| greedy equal | bytes accessed / (weights + live KV), batch 1 / 64 (pool fitted) "
          "| batch-1 / roofline |",
          "|---|---|---|---|---|---|---|---|---|"]
  for r in reports:
    p = r["pairs"]
    med = lambda k: float(np.median([x[k] for x in p])) if p and k in p[0] else float("nan")
    ratios = ", ".join(f"{x['throughput_ratio']:.2f}" for x in p if "throughput_ratio" in x)
    eq = f"{min(x['greedy_equal'] for x in p)}/{r['job']['num_prompts']}" if p and "greedy_equal" in p[0] else "-"
    cost = " / ".join(f"{c['accessed_over_needed']:.2f} ({c['fitted_over_needed']:.2f})"
                      for c in r["decode_cost"])
    roof = f"{r['roofline']['over_roofline']:.2f}" if "roofline" in r else "-"
    rows.append(f"| {r['job']['shape']} | {med('jblock_tok_s'):.0f} | {med('vllm_tok_s'):.0f} | {ratios} "
                f"| {med('jblock_batch1_ms'):.1f} | {med('vllm_batch1_ms'):.1f} | {eq} | {cost} | {roof} |")
  return rows


def run_all(shapes, work_dir: str, vllm_python: str | None, pairs: int, progress=print
            ) -> dict[str, Any]:
  os.makedirs(work_dir, exist_ok=True)
  bandwidth = memory_bandwidth()["bytes_per_s"]
  reports = []
  for shape in shapes:
    report = compare(Job(shape, pairs=pairs), work_dir, vllm_python, progress)
    report["roofline"] = roofline(report, bandwidth)
    reports.append(report)
  long_context = long_context_step(work_dir, progress=progress)
  progress(f"long context: {long_context['decode_step_ms']}, ratio "
           f"{long_context['ratio_2048_over_128']:.2f}")
  return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__,
          "long_context": long_context,
          "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
          "bandwidth_bytes_per_s": bandwidth, "reports": reports,
          "table": summary_rows(reports)}
