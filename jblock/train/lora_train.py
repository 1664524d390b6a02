"""LoRA adapters trained in JAX through the served block functions, written in PEFT format.

The base chain is frozen; per targeted HF module, A [r, in] starts random and B [out, r] at zero
(PEFT's init), and real Adam steps train both through the same per-row bank op that serving
runs (jblock.models.lora), so tests and benches get realistic adapters. `write_peft` saves
`adapter_config.json` + `adapter_model.safetensors` with PEFT's tensor names.
"""

import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jblock.blocks import HEAD, LAYERS
from jblock.convert.hf import convert
from jblock.convert.peft import PREFIX, module_table
from jblock.models import blocks as block_fns
from jblock.models.attention import contiguous_meta
from jblock.train.finetune import TrainConfig, _adam, sample_windows


@dataclasses.dataclass
class LoraResult:
  factors: dict[str, tuple[np.ndarray, np.ndarray]]  # HF module -> (A [r, in], B [out, r])
  loss_start: float
  loss_end: float


def _targets(table, targets: Sequence[str]) -> list[str]:
  return [m for m in table if any(m == t or m.endswith(f".{t}") for t in targets)]


def train_lora(base_hf_dir: str, stream: np.ndarray, targets: Sequence[str], r: int = 8,
               alpha: float = 16.0, cfg: TrainConfig = TrainConfig(),
               progress: Callable[[str], None] | None = None) -> LoraResult:
  """Trains one LoRA adapter of rank r over the base checkpoint on a token stream."""
  base = convert(base_hf_dir, "float32", layers_per_block=1)
  blocks = base.blocks
  table = module_table(base.config)
  modules = _targets(table, targets)
  if not modules:
    raise ValueError(f"targets {list(targets)} match no projection of the base")
  layer_pos = [i for i, b in enumerate(blocks) if b.kind == LAYERS]  # one layer per block
  scale = alpha / r
  rng = np.random.default_rng(cfg.seed)
  params, splits = {}, {}
  for m in modules:
    layer, paths = table[m]
    kernels = [blocks[layer_pos[layer]].params["layer_0"] for _ in paths]
    for p_i, path in enumerate(paths):
      for part in path.split("/"):
        kernels[p_i] = kernels[p_i][part]
    d_in = kernels[0]["kernel"].shape[0]
    outs = [k["kernel"].shape[1] for k in kernels]
    params[m] = {"a": jnp.asarray(rng.normal(0, 1 / np.sqrt(d_in), (d_in, r)), jnp.float32),
                 "b": jnp.zeros((r, sum(outs)), jnp.float32)}
    splits[m] = (layer, paths, outs)
  fns = [block_fns.apply_fn(b.kind, b.config) for b in blocks]
  frozen = [jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), b.params) for b in blocks]

  def loss_fn(lora, tokens, lengths):
    b, t = tokens.shape
    meta = contiguous_meta(b, t, 0, lengths)
    banks = [dict() for _ in blocks]
    for m, (layer, paths, outs) in splits.items():
      parts = jnp.split(lora[m]["b"] * scale, np.cumsum(outs)[:-1], axis=1)
      for path, bp in zip(paths, parts):
        # One-slot bank in the serving layout: a [1, r, in] (A transposed), b [1, r, out].
        banks[layer_pos[layer]][f"layer_0/{path}"] = {"a": lora[m]["a"].T[None], "b": bp[None]}
    x = tokens
    for i, (block, fn) in enumerate(zip(blocks, fns)):
      p = frozen[i]
      step_meta = dict(meta)
      if block.kind == HEAD and block.config["tied_to"] is not None:
        p = {**p, "embedding": frozen[0]["embedding"]}
      kv = block_fns.init_kv(block.config, b, t, jnp.float32) if block.kind == LAYERS else {}
      if banks[i]:
        step_meta.update(lora=banks[i], adapter=jnp.zeros(b, jnp.int32))
      x, _ = fn(p, kv, x, step_meta)
    logp = jax.nn.log_softmax(x[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = (jnp.arange(t - 1)[None, :] < (lengths - 1)[:, None]).astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  @jax.jit
  def step(lora, opt, tokens, lengths):
    loss, grads = jax.value_and_grad(loss_fn)(lora, tokens, lengths)
    updates, opt = _adam(grads, opt, cfg)
    return jax.tree.map(jnp.add, lora, updates), opt, loss

  eval_loss = jax.jit(loss_fn)
  zeros = jax.tree.map(jnp.zeros_like, params)
  opt = {"count": jnp.zeros((), jnp.int32), "mu": zeros, "nu": zeros}
  eval_batch = sample_windows(stream, cfg, np.random.default_rng([cfg.seed, 1]))
  loss_start = float(eval_loss(params, *eval_batch))
  for n in range(cfg.steps):
    params, opt, loss = step(params, opt, *sample_windows(stream, cfg, rng))
    if progress and (n + 1) % max(1, cfg.steps // 5) == 0:
      progress(f"  step {n + 1}/{cfg.steps}: loss {float(loss):.4f}")
  loss_end = float(eval_loss(params, *eval_batch))
  factors = {m: (np.asarray(p["a"]).T.copy(), np.asarray(p["b"]).T.copy())
             for m, p in params.items()}
  return LoraResult(factors, loss_start, loss_end)


def write_peft(out_dir: str, factors: dict[str, tuple[np.ndarray, np.ndarray]],
               targets: Sequence[str], r: int, alpha: float, base_name: str = "",
               fan_in_fan_out: bool = False, extra: dict | None = None) -> str:
  """adapter_config.json + adapter_model.safetensors with PEFT's names for these factors."""
  os.makedirs(out_dir, exist_ok=True)
  tensors = {}
  for m, (a, b) in factors.items():
    tensors[f"{PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
    tensors[f"{PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False,
            "target_modules": list(targets), "bias": "none", "fan_in_fan_out": fan_in_fan_out,
            "modules_to_save": None, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
            "init_lora_weights": True, **(extra or {})}
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return out_dir


def make_lora_variants(base_hf_dir: str, out_dir: str, n: int, targets: Sequence[str],
                       ranks: Sequence[int] = (8,), alpha_over_r: float = 2.0, steps: int = 50,
                       seed: int = 0, lr: float = 3e-3, batch_size: int = 8, seq_len: int = 32,
                       progress: Callable[[str], None] | None = print) -> list[str]:
  """n PEFT adapters (out_dir/lora_{1..n}), adapter i of rank ranks[i % len(ranks)], each trained
  on its own synthetic token pattern."""
  from jblock.train.variants import LINEAGE_FILE, synthetic_stream
  say = progress or (lambda _: None)
  with open(os.path.join(base_hf_dir, "config.json")) as f:
    gpt2 = json.load(f).get("model_type") == "gpt2"
  vocab = convert(base_hf_dir, "float32").config.vocab_size
  dirs = []
  for i in range(1, n + 1):
    r = int(ranks[(i - 1) % len(ranks)])
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                      seed=seed * 1000 + i)
    say(f"lora {i}/{n}: rank {r}, {steps} steps on {', '.join(targets)}")
    result = train_lora(base_hf_dir, synthetic_stream(vocab, 4096, cfg.seed), targets, r,
                        alpha_over_r * r, cfg, progress=say)
    d = write_peft(os.path.join(out_dir, f"lora_{i}"), result.factors, targets, r,
                   alpha_over_r * r, os.path.abspath(base_hf_dir), fan_in_fan_out=gpt2)
    with open(os.path.join(d, LINEAGE_FILE), "w") as f:
      json.dump({"base_hf_dir": os.path.abspath(base_hf_dir), "kind": "lora", "r": r,
                 "steps": steps, "seed": cfg.seed, "loss_start": round(result.loss_start, 6),
                 "loss_end": round(result.loss_end, 6)}, f, indent=2)
    say(f"lora {i}/{n}: loss {result.loss_start:.4f} -> {result.loss_end:.4f}, wrote {d}")
    dirs.append(d)
  return dirs
