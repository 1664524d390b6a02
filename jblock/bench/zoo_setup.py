"""The benchmark's models: a new base of a preset size, N partial fine-tunes, one block zoo.

Built once per (preset, trainable fraction, steps, seed) under a work directory and reused by
later runs that need at most as many variants: variant i is the same whatever N is (its seed
and data follow from i), so a run needing N variants uses the first N.
"""

import dataclasses
import json
import os
import shutil
from typing import Callable

from jblock.train import variants

# Base sizes (llama family). The default sweep uses "medium" (34M params: 134 MB of float32
# weights, well above the CPU's caches, so decode reads them from memory) to finish in under 20
# minutes on a 2-core CPU; "100m" is the target scale (110M params, 12 layers, the top 3
# trained at fraction 0.25).
PRESETS = {
    "tiny": variants.BaseSpec(family="llama", hidden=64, layers=4, heads=4, vocab=257,
                              max_positions=512),
    "small": variants.BaseSpec(family="llama", hidden=256, layers=8, heads=4, vocab=4096,
                               max_positions=512),
    "medium": variants.BaseSpec(family="llama", hidden=512, layers=8, heads=8, vocab=8192,
                                max_positions=512),
    "100m": variants.BaseSpec(family="llama", hidden=768, layers=12, heads=12, vocab=16000,
                              max_positions=1024),
}
# The small base with room for long prompts (a 1,024-token system prompt: tools.prefix_bench).
PRESETS["small-long"] = dataclasses.replace(PRESETS["small"], max_positions=2048)
# The newer families at the tiny size (hidden 64, 4 layers): Qwen3 (q/k norms), Gemma 2 and 3
# (soft-caps, sliding windows, tied head), Phi-3 (fused projections), Mixtral (4 experts, top 2).
for _family in ("qwen3", "gemma2", "gemma3", "phi3", "mixtral"):
  PRESETS[f"tiny-{_family}"] = dataclasses.replace(PRESETS["tiny"], family=_family, kv_heads=2)
_READY_FILE = "ready.json"


@dataclasses.dataclass(frozen=True)
class BenchModels:
  zoo_dir: str
  names: list[str]  # zoo model names, variant_1 first (the most popular in the workload)
  hf_dirs: list[str]  # the HF checkpoints they were converted from
  preset: str
  spec: dict
  trainable_top_layers: int
  params: int  # parameters of one model


def trainable_layers(layers: int, fraction: float) -> int:
  return min(layers, max(1, round(layers * fraction)))


def param_count(spec: variants.BaseSpec) -> int:
  hidden, layers, vocab = spec.hidden, spec.layers, spec.vocab
  head_dim = hidden // spec.heads
  kv = (spec.kv_heads or spec.heads) * head_dim
  inter = spec.intermediate or -(-8 * hidden // 3 // 8) * 8
  mlp = 3 * hidden * inter
  if spec.family == "mixtral":  # every expert's MLP and the router
    mlp = spec.experts * mlp + hidden * spec.experts
  norms = 4 if spec.family in ("gemma2", "gemma3") else 2  # gemma: norms after attention, MLP too
  qk_norms = 2 * head_dim if spec.family in ("qwen3", "gemma3") else 0
  per_layer = 2 * hidden * hidden + 2 * hidden * kv + mlp + norms * hidden + qk_norms
  tied = spec.tie or spec.family in ("gemma2", "gemma3")
  return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def prepare(work_dir: str, preset: str, n: int, trainable_fraction: float = 0.25,
            steps: int = 4, seed: int = 0,
            say: Callable[[str], None] = print) -> BenchModels:
  """The base, n variants and a zoo holding them all; reuses what a previous run built."""
  if preset not in PRESETS:
    raise ValueError(f"unknown base size {preset!r}; one of {', '.join(PRESETS)}")
  spec = PRESETS[preset]
  top = trainable_layers(spec.layers, trainable_fraction)
  root = os.path.join(os.path.abspath(work_dir), f"{preset}_top{top}_steps{steps}_seed{seed}")
  ready = os.path.join(root, _READY_FILE)
  done = {}
  if os.path.isfile(ready):
    with open(ready) as f:
      done = json.load(f)
  names = [f"variant_{i}" for i in range(1, n + 1)]
  if done.get("n", 0) < n:
    # Variant i's seed and data follow from i, so a larger N is made afresh (all of it).
    shutil.rmtree(root, ignore_errors=True)
    base_dir = os.path.join(root, "hf", "base")
    say(f"setup: new {preset} base ({param_count(spec) / 1e6:.1f}M params) -> {base_dir}")
    variants.init_base(spec, base_dir, seed=seed)
    say(f"setup: fine-tuning {n} variants (top {top} of {spec.layers} layers, {steps} steps each)")
    variants.make_variants(base_dir, os.path.join(root, "hf"), n, trainable_top_layers=top,
                           steps=steps, seed=seed, progress=None)
    from jblock.zoo.store import Zoo
    zoo = Zoo(os.path.join(root, "zoo"))
    for i, name in enumerate(names):
      say(f"setup: converting {name} into the zoo ({i + 1}/{n})")
      zoo.convert(os.path.join(root, "hf", name), name)
    with open(ready, "w") as f:
      json.dump({"n": n}, f)
  return BenchModels(zoo_dir=os.path.join(root, "zoo"), names=names,
                     hf_dirs=[os.path.join(root, "hf", name) for name in names], preset=preset,
                     spec=dataclasses.asdict(spec), trainable_top_layers=top,
                     params=param_count(spec))
