"""Prefix caching measured side by side: the same engine with it on and off, one run.

Models: N partial fine-tunes of one base (top quarter of the layers trained; embed, the bottom
layers and the head shared), from jblock.bench.zoo_setup. Four figures:

1. TTFT of a request whose long system prompt is cached vs one whose prompt is new, one model,
   the same engine (rounds alternate; the median of each is reported).
2. KV pages held for the system prompt after every model served one request behind it, vs one
   copy per model (what per-model serving, or jblock with caching off, holds).
3. A burst of requests over all models behind that prompt, caching on vs off: prompt tokens
   computed per block (counted by the scheduler) weighted by each block's parameters (dense
   FLOPs = 2 x params x tokens; attention's context term not counted), and output tok/s.
4. Decode tok/s with caching on but nothing to reuse (fresh prompts) vs off: its overhead.

Every token of the "on" runs is compared with the "off" run's: caching never changes them.
"""

import dataclasses
import statistics
import time
from typing import Callable

import numpy as np

from jblock.bench import zoo_setup
from jblock.runtime.engine import Engine, EngineConfig


@dataclasses.dataclass(frozen=True)
class PrefixBenchConfig:
  preset: str = "small-long"
  variants: int = 8
  system_tokens: int = 1024
  suffix_tokens: int = 32
  new_tokens: int = 32
  burst: int = 32  # requests of the throughput burst, spread evenly over the variants
  ttft_rounds: int = 5
  decode_streams: int = 8
  decode_prompt_tokens: int = 64  # fresh prompts: nothing to reuse, prefill small beside decode
  decode_tokens: int = 128
  decode_rounds: int = 5
  page_size: int = 16
  prefill_chunk: int = 256
  batch_size: int = 8
  seed: int = 0


def engine_config(cfg: PrefixBenchConfig, caching: bool) -> EngineConfig:
  longest = cfg.system_tokens + cfg.suffix_tokens + max(cfg.new_tokens, cfg.decode_tokens)
  return EngineConfig(batch_size=cfg.batch_size, kv_slots=max(cfg.burst, cfg.decode_streams),
                      page_size=cfg.page_size, max_seq_len=-(-longest // 64) * 64,
                      prefill_chunk=cfg.prefill_chunk, length_buckets=(64, cfg.prefill_chunk),
                      warmup=False, enable_prefix_caching=caching)


class _Prompts:
  """Random token prompts from one seeded stream (a new system prompt per call of `system`)."""

  def __init__(self, vocab: int, seed: int):
    self._rng = np.random.default_rng(seed)
    self._vocab = vocab

  def tokens(self, n: int) -> list[int]:
    return [int(t) for t in self._rng.integers(1, self._vocab, n)]


def _ttft(engine: Engine, model: str, prompt: list[int], new: int) -> tuple[float, list[int]]:
  t0 = time.perf_counter()
  handle = engine.submit(model, prompt, max_new_tokens=new)
  first = None
  for _ in handle:
    if first is None:
      first = time.perf_counter() - t0
  return first, handle.result(600)


def _burst(engine: Engine, jobs: list[tuple[str, list[int]]], new: int) -> tuple[float, list]:
  t0 = time.perf_counter()
  handles = [engine.submit(m, p, max_new_tokens=new) for m, p in jobs]
  out = [h.result(600) for h in handles]
  return time.perf_counter() - t0, out


def _layer_bytes(engine: Engine) -> dict[str, int]:
  """Instance key -> weight bytes of its layers block."""
  return {b["key"]: b["resident_bytes"] for b in engine.stats()["blocks"] if b["kind"] == "layers"}


def _prefix_pages(engine: Engine, prefix_pages: int, own_pages: int) -> dict[str, int]:
  """KV pages the layers blocks hold cached for a prompt prefix of `prefix_pages` full pages,
  after one request per model (each also registered `own_pages` pages of its own suffix), vs
  one copy per model through each block."""
  held = copies = 0
  for block in engine.stats()["blocks"]:
    if block["kind"] == "layers":
      users = len(block["models"])
      held += block["prefix_cached_pages"] - users * own_pages
      copies += prefix_pages * users
  return {"held": held, "one_copy_per_model": copies}


def run(work_dir: str, cfg: PrefixBenchConfig, say: Callable[[str], None] = print) -> dict:
  models = zoo_setup.prepare(work_dir, cfg.preset, cfg.variants, say=say)
  spec = zoo_setup.PRESETS[cfg.preset]
  prompts = _Prompts(spec.vocab, cfg.seed)
  names = models.names
  result: dict = {"config": dataclasses.asdict(cfg), "preset": dataclasses.asdict(spec),
                  "params_per_model": models.params,
                  "trainable_top_layers": models.trainable_top_layers}
  engines = {c: Engine.from_zoo(models.zoo_dir, names, mesh_shape=(1, 1),
                                config=engine_config(cfg, c)) for c in (True, False)}
  try:
    # Unmeasured warm-up: every shape the measured parts reach, compiled on both engines.
    warm_system = prompts.tokens(cfg.system_tokens)
    warm_jobs = [(names[i % len(names)], warm_system + prompts.tokens(cfg.suffix_tokens))
                 for i in range(cfg.burst)]
    fresh = [prompts.tokens(cfg.decode_prompt_tokens) for _ in range(cfg.decode_streams)]
    for caching, engine in engines.items():
      say(f"warm-up (caching {'on' if caching else 'off'})")
      _burst(engine, warm_jobs, cfg.new_tokens)
      _burst(engine, [(names[0], p) for p in fresh], cfg.decode_tokens)
      _ttft(engine, names[0], warm_system + prompts.tokens(cfg.suffix_tokens), cfg.new_tokens)
    result["ttft"] = _ttft_figures(engines, names[0], prompts, cfg, say)
    result["kv_pages_for_the_prompt"] = _kv_figure(models.zoo_dir, names, prompts, cfg)
    result["burst"] = _burst_figures(engines, names, prompts, cfg, say)
    result["decode_no_reuse"] = _decode_figures(engines, names[0], prompts, cfg, say)
  finally:
    for engine in engines.values():
      engine.close()
  return result


def _ttft_figures(engines, model, prompts, cfg, say) -> dict:
  """Figure 1, on the caching engine: a cached system prompt vs a new one, rounds alternating."""
  engine = engines[True]
  system = prompts.tokens(cfg.system_tokens)
  _ttft(engine, model, system + prompts.tokens(cfg.suffix_tokens), 1)  # caches `system`
  cached, uncached, same = [], [], True
  for r in range(cfg.ttft_rounds):
    suffix = prompts.tokens(cfg.suffix_tokens)
    t, tokens = _ttft(engine, model, system + suffix, cfg.new_tokens)
    cached.append(t)
    _, off_tokens = _ttft(engines[False], model, system + suffix, cfg.new_tokens)
    same &= tokens == off_tokens
    t, _ = _ttft(engine, model, prompts.tokens(cfg.system_tokens) + suffix, cfg.new_tokens)
    uncached.append(t)
    say(f"ttft round {r + 1}: cached {cached[-1] * 1e3:.1f} ms, new prompt {t * 1e3:.1f} ms")
  c, u = statistics.median(cached), statistics.median(uncached)
  return {"cached_s": round(c, 4), "uncached_s": round(u, 4), "ratio": round(c / u, 3),
          "rounds_cached_s": [round(x, 4) for x in cached],
          "rounds_uncached_s": [round(x, 4) for x in uncached], "tokens_equal_to_off": same}


def _kv_figure(zoo_dir, names, prompts, cfg) -> dict:
  """Figure 2, on a fresh caching engine (nothing else cached): one request per model behind
  one system prompt, then the pages every layers block holds cached for that prompt."""
  pages = cfg.system_tokens // cfg.page_size
  own = (cfg.system_tokens + cfg.suffix_tokens) // cfg.page_size - pages
  system = prompts.tokens(cfg.system_tokens)
  with Engine.from_zoo(zoo_dir, names, mesh_shape=(1, 1), config=engine_config(cfg, True)) as engine:
    for m in names:
      engine.generate(m, system + prompts.tokens(cfg.suffix_tokens), max_new_tokens=1)
    held = _prefix_pages(engine, pages, own)
  return {**held, "ratio": round(held["held"] / held["one_copy_per_model"], 3),
          "pages_per_block_copy": pages}


def _burst_figures(engines, names, prompts, cfg, say) -> dict:
  """Figure 3: a burst over all models behind a new system prompt (prompt tokens computed per
  block, tok/s), caching off then on."""
  out = {}
  system = prompts.tokens(cfg.system_tokens)
  jobs = [(names[i % len(names)], system + prompts.tokens(cfg.suffix_tokens))
          for i in range(cfg.burst)]
  runs = {}
  for caching in (False, True):
    engine = engines[caching]
    before = engine.stats()["prefix_cache"]["computed_tokens"]
    wall, tokens = _burst(engine, jobs, cfg.new_tokens)
    after = engine.stats()["prefix_cache"]["computed_tokens"]
    weights = _layer_bytes(engine)
    computed = {k: after.get(k, {}).get("prompt", 0) - before.get(k, {}).get("prompt", 0)
                for k in weights}
    runs[caching] = {"wall_s": wall, "tokens": tokens, "computed": computed, "weights": weights}
    say(f"burst (caching {'on' if caching else 'off'}): {wall:.2f} s")
  on, off = runs[True], runs[False]

  def prompt_flops(run):  # layers blocks' dense FLOPs on prompt tokens (float32: 4 B a param)
    flops = sum(2 * n * run["weights"][key] // 4 for key, n in run["computed"].items())
    return flops, sum(run["computed"].values())

  f_on, t_on = prompt_flops(on)
  f_off, t_off = prompt_flops(off)
  generated = cfg.burst * cfg.new_tokens
  out.update({
      "requests": cfg.burst, "models": len(names),
      "prompt_layer_tokens": {"on": t_on, "off": t_off, "ratio": round(t_on / t_off, 3)},
      "prefill_flops": {"on": f_on, "off": f_off, "ratio": round(f_on / f_off, 3)},
      "tok_s": {"on": round(generated / on["wall_s"], 1), "off": round(generated / off["wall_s"], 1),
                "ratio": round(off["wall_s"] / on["wall_s"], 3)},
      "wall_s": {"on": round(on["wall_s"], 3), "off": round(off["wall_s"], 3)},
      "tokens_equal": on["tokens"] == off["tokens"],
  })
  return out


def _decode_figures(engines, model, prompts, cfg, say) -> dict:
  """Figure 4: streams of fresh prompts (nothing to reuse), caching on vs off in turns."""
  rates = {True: [], False: []}
  same = True
  for r in range(cfg.decode_rounds):
    batch = [prompts.tokens(cfg.decode_prompt_tokens) for _ in range(cfg.decode_streams)]
    outs = {}
    for caching in (False, True) if r % 2 else (True, False):
      wall, outs[caching] = _burst(engines[caching], [(model, p) for p in batch], cfg.decode_tokens)
      rates[caching].append(cfg.decode_streams * cfg.decode_tokens / wall)
    same &= outs[True] == outs[False]
    say(f"decode round {r + 1}: on {rates[True][-1]:.1f} tok/s, off {rates[False][-1]:.1f} tok/s")
  on, off = statistics.median(rates[True]), statistics.median(rates[False])
  per_round = [round(a / b, 3) for a, b in zip(rates[True], rates[False])]
  return {"tok_s_on": round(on, 1), "tok_s_off": round(off, 1), "ratio": round(on / off, 3),
          "round_ratios": per_round,
          "tokens_equal": same, "streams": cfg.decode_streams, "tokens": cfg.decode_tokens}
