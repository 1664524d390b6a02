"""The decode roofline: weight bytes one step must read / the machine's memory bandwidth.

Bandwidth is measured with a streaming read on every core (numpy sums of disjoint slices of an
array far larger than the caches, one thread each; numpy releases the GIL inside the loop).
The engine's measured batch-1 decode step (one request alone, token gaps after the first)
sits beside it.
"""

import concurrent.futures
import os
import time
from typing import Sequence

import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS


def memory_bandwidth(total_bytes: int = 1 << 30, threads: int | None = None,
                     repeats: int = 5) -> dict:
  """Best-of-`repeats` read bandwidth in bytes/s over `total_bytes` (float64, split per thread)."""
  threads = threads or os.cpu_count() or 1
  data = np.ones(total_bytes // 8, np.float64)  # ones, not empty: pages are really there
  parts = np.array_split(data, threads)
  best = float("inf")
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for _ in range(repeats):
      t0 = time.perf_counter()
      sums = list(pool.map(np.sum, parts))
      best = min(best, time.perf_counter() - t0)
  assert sum(sums) == data.size  # the reads really happened
  return {"bytes": int(data.nbytes), "threads": threads, "best_s": best,
          "bytes_per_s": data.nbytes / best}


def decode_bytes(block_records: Sequence[dict], context_len: int) -> dict:
  """Bytes one batch-1 decode step must read: every layer and head weight, one embedding row,
  and the KV cache of `context_len` earlier tokens (the physical minimum, not what a padded
  implementation reads)."""
  weights = kv = 0
  table_bytes = 0
  for record in block_records:
    config = record["config"]
    if record["kind"] == EMBED:
      table_bytes = record["nbytes"]  # a tied head reads it whole
      itemsize = np.dtype(next(iter(record["leaves"].values()))["dtype"]).itemsize
      weights += config["hidden_size"] * itemsize  # decode looks up one row
    elif record["kind"] == LAYERS:
      weights += record["nbytes"]
      itemsize = np.dtype(next(iter(record["leaves"].values()))["dtype"]).itemsize
      kv += (2 * config["num_layers"] * context_len * config["num_kv_heads"] * config["head_dim"]
             * itemsize)
    elif record["kind"] == HEAD:
      weights += record["nbytes"] + (table_bytes if config.get("tied_to") else 0)
  return {"weight_bytes": int(weights), "kv_bytes": int(kv), "total_bytes": int(weights + kv)}


def measure_batch1(zoo_dir: str, model: str, prompt_len: int, new_tokens: int, repeats: int = 3,
                   compilation_cache_dir: str | None = None, kv_slots: int = 16) -> dict:
  """The block engine serving one request at a time: its decode step, TTFT and e2e latency.

  kv_slots: as configured for serving (the KV buffer a step updates has this many slots).
  """
  from jblock.runtime.engine import Engine, EngineConfig
  config = EngineConfig(batch_size=1, kv_slots=kv_slots, max_seq_len=prompt_len + new_tokens,
                        prefill_chunk=max(16, prompt_len), length_buckets=(max(16, prompt_len),),
                        compilation_cache_dir=compilation_cache_dir)
  steps, ttfts, e2es = [], [], []
  with Engine.from_zoo(zoo_dir, [model], mesh_shape=(1, 1), config=config) as engine:
    prompt = [1 + (i % 7) for i in range(prompt_len)]
    engine.generate(model, prompt, max_new_tokens=2)  # first-call costs off the clock
    for _ in range(repeats):
      handle = engine.submit(model, prompt, max_new_tokens=new_tokens)
      handle.result(timeout=600)
      steps.append((handle.finished_at - handle.first_token_at) / (new_tokens - 1))
      ttfts.append(handle.first_token_at - handle.submitted_at)
      e2es.append(handle.finished_at - handle.submitted_at)
  return {"decode_step_s": float(np.median(steps)), "ttft_s": float(np.median(ttfts)),
          "e2e_s": float(np.median(e2es)), "prompt_len": prompt_len, "new_tokens": new_tokens}


def roofline(zoo_dir: str, model: str, prompt_len: int, new_tokens: int,
             compilation_cache_dir: str | None = None, bandwidth_bytes: int = 1 << 30,
             kv_slots: int = 16) -> dict:
  """Bandwidth, the decode-step roofline of `model` and the engine's measured batch-1 step."""
  from jblock.zoo.store import Zoo
  zoo = Zoo(zoo_dir)
  records = [zoo.block_record(i) for i in zoo.manifest(model)["chain"]]
  # Mid-generation context: the average step of the measured requests sees this many tokens.
  touched = decode_bytes(records, prompt_len + new_tokens // 2)
  bandwidth = memory_bandwidth(bandwidth_bytes)
  measured = measure_batch1(zoo_dir, model, prompt_len, new_tokens,
                            compilation_cache_dir=compilation_cache_dir, kv_slots=kv_slots)
  bound = touched["total_bytes"] / bandwidth["bytes_per_s"]
  return {"bandwidth_gb_s": bandwidth["bytes_per_s"] / 1e9, "bandwidth": bandwidth,
          "bytes_per_step": touched, "roofline_step_s": bound,
          "measured": measured, "measured_over_roofline": measured["decode_step_s"] / bound}
