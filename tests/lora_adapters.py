"""PEFT-format LoRA adapters written offline (no peft package), and their merged HF checkpoints.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with PEFT's
exact tensor names (`base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight`
[out, r]); the merged checkpoint is the base with W + scale * B @ A folded into every adapted
weight (transposed for GPT-2's Conv1D), which transformers then runs as the reference.
"""

import json
import os
import re
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

LLAMA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GPT2_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _pattern(patterns, module, default):
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def make_adapter(base_dir: str, out_dir: str, targets, r: int = 4, alpha: float = 8.0,
                 rslora: bool = False, rank_pattern=None, alpha_pattern=None, seed: int = 0,
                 layers=None, modules_to_save=(), std: float = 0.2, extra_config=None,
                 merged_dir: str | None = None) -> str:
  """Writes a PEFT LoRA adapter over the HF checkpoint `base_dir`; optionally its merge."""
  with open(os.path.join(base_dir, "config.json")) as f:
    hf = json.load(f)
  gpt2 = hf["model_type"] == "gpt2"
  n_layers = hf["n_layer"] if gpt2 else hf["num_hidden_layers"]
  prefix = "transformer.h" if gpt2 else "model.layers"
  base = load_file(os.path.join(base_dir, "model.safetensors"))
  rng = np.random.default_rng(seed)
  tensors, merged = {}, dict(base)
  for layer in range(n_layers):
    if layers is not None and layer not in layers:
      continue
    for module in (GPT2_MODULES if gpt2 else LLAMA_MODULES):
      if not any(module == t or module.endswith(f".{t}") or module.split(".")[-1] == t
                 for t in targets):
        continue
      name = f"{prefix}.{layer}.{module}"
      w = base[f"{name}.weight"]
      d_out, d_in = (w.shape[1], w.shape[0]) if gpt2 else w.shape
      rank = int(_pattern(rank_pattern, name, r))
      a = rng.normal(0, std, (rank, d_in)).astype(np.float32)
      b = rng.normal(0, std, (d_out, rank)).astype(np.float32)
      tensors[f"base_model.model.{name}.lora_A.weight"] = a
      tensors[f"base_model.model.{name}.lora_B.weight"] = b
      al = float(_pattern(alpha_pattern, name, alpha))
      scale = al / (rank ** 0.5 if rslora else rank)
      delta = scale * (b.astype(np.float64) @ a.astype(np.float64))
      merged[f"{name}.weight"] = (w + (delta.T if gpt2 else delta)).astype(np.float32)
  for module in modules_to_save:
    name = {"lm_head": "lm_head.weight", "embed_tokens": "model.embed_tokens.weight"}[module]
    w = base[name] + rng.normal(0, std, base[name].shape).astype(np.float32)
    tensors[f"base_model.model.{name}"] = w
    merged[name] = w
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_dir,
            "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": rslora,
            "target_modules": list(targets), "rank_pattern": rank_pattern or {},
            "alpha_pattern": alpha_pattern or {}, "bias": "none", "fan_in_fan_out": gpt2,
            "modules_to_save": list(modules_to_save) or None, "use_dora": False,
            "layers_to_transform": list(layers) if layers is not None else None,
            "init_lora_weights": True, **(extra_config or {})}
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if merged_dir:
    shutil.copytree(base_dir, merged_dir, dirs_exist_ok=True)
    save_file(merged, os.path.join(merged_dir, "model.safetensors"), metadata={"format": "pt"})
  return out_dir
