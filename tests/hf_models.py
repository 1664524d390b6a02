"""Tiny Hugging Face models built offline from configs (prime dimensions, fixed seeds)."""

import os

import torch
import transformers

# Wide init so greedy argmax has clear margins (no near-ties between implementations).
INIT_RANGE = 0.2

BASE = dict(vocab_size=97, hidden_size=40, intermediate_size=53, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=INIT_RANGE, eos_token_id=None, bos_token_id=None, pad_token_id=None)

CONFIGS = {
    "llama": ("LlamaConfig", dict(BASE)),
    "llama_tied_mha": ("LlamaConfig", dict(BASE, num_key_value_heads=4, tie_word_embeddings=True,
                                           rms_norm_eps=1e-5)),
    "llama_linear_bias": ("LlamaConfig", dict(BASE, attention_bias=True, mlp_bias=True,
                                              rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 500.0})),
    "llama3_rope_head_dim": ("LlamaConfig", dict(BASE, head_dim=14, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0})),
    "mistral_window": ("MistralConfig", dict(BASE, sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(BASE, tie_word_embeddings=True)),
    "qwen2_sliding": ("Qwen2Config", dict(BASE, use_sliding_window=True, sliding_window=4,
                                          max_window_layers=1)),
    "llama_yarn": ("LlamaConfig", dict(BASE, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "rope_theta": 10000.0})),
    # max_position_embeddings 8 < the test sequences: the NTK base grows with the length.
    "llama_dynamic": ("LlamaConfig", dict(BASE, max_position_embeddings=8, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "qwen3": ("Qwen3Config", dict(BASE, head_dim=14)),
    "qwen3_tied_sliding": ("Qwen3Config", dict(BASE, head_dim=14, tie_word_embeddings=True,
                                               use_sliding_window=True, sliding_window=4,
                                               max_window_layers=1, attention_bias=True)),
    "gemma2": ("Gemma2Config", dict(BASE, head_dim=12, query_pre_attn_scalar=11,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                    sliding_window=4, rms_norm_eps=1e-5)),
    "gemma3": ("Gemma3TextConfig", dict(
        BASE, head_dim=12, query_pre_attn_scalar=13, sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0}})),
    # LongRoPE short factors (sequences stay under original_max_position_embeddings).
    "phi3": ("Phi3Config", dict(BASE, original_max_position_embeddings=64, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0],
        "long_factor": [2.0, 3.0, 5.0, 7.0, 11.0]})),
    # Partial rotary (6 of 10 dims), LongRoPE long factors (every sequence is past 2 positions:
    # transformers' Phi-3 recomputes the whole cache when a generation crosses that length, see
    # README), a 7-token window.
    "phi3_longrope_partial": ("Phi3Config", dict(
        BASE, sliding_window=7, original_max_position_embeddings=2,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.6, "short_factor": [1.0, 1.3, 1.7],
                         "long_factor": [1.9, 3.1, 5.3]})),
    # LongRoPE with a short original length (8): generations cross it, chunked prompts pass it.
    "phi3_longrope_crossing": ("Phi3Config", dict(
        BASE, original_max_position_embeddings=8, max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0],
                         "long_factor": [1.7, 2.9, 4.3, 6.1, 9.7]})),
    "mixtral": ("MixtralConfig", dict(BASE, num_local_experts=4, num_experts_per_tok=2,
                                      intermediate_size=23, sliding_window=6)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(BASE, num_experts=5, num_experts_per_tok=2,
                                         moe_intermediate_size=19,
                                         shared_expert_intermediate_size=29,
                                         norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(BASE, head_dim=14, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=19, norm_topk_prob=True)),
    "gpt2": ("GPT2Config", dict(vocab_size=97, n_embd=40, n_layer=3, n_head=5, n_positions=128,
                                initializer_range=INIT_RANGE, eos_token_id=None, bos_token_id=None)),
    "gpt2_inner_relu": ("GPT2Config", dict(vocab_size=97, n_embd=40, n_layer=2, n_head=4,
                                           n_inner=59, activation_function="relu", n_positions=128,
                                           initializer_range=INIT_RANGE, eos_token_id=None,
                                           bos_token_id=None)),
}


# Even MLP width and vocab so a 2-way model axis splits every projection (engine mesh tests).
ENGINE_BASE = ("LlamaConfig", dict(BASE, intermediate_size=64, vocab_size=128, num_hidden_layers=4))


def partial_variants(base_dir: str, out_root: str, n: int, top_layers: int, seed: int = 1) -> list[str]:
  """n HF checkpoints that differ from the base only in their top `top_layers` layers."""
  import json
  import shutil
  import numpy as np
  from safetensors.numpy import load_file, save_file
  with open(os.path.join(base_dir, "config.json")) as f:
    num_layers = json.load(f)["num_hidden_layers"]
  trained = {f"model.layers.{i}." for i in range(num_layers - top_layers, num_layers)}
  dirs = []
  for v in range(n):
    out = os.path.join(out_root, f"variant_{v}")
    shutil.copytree(base_dir, out)
    tensors = load_file(os.path.join(base_dir, "model.safetensors"))
    rng = np.random.default_rng(seed + v)
    for name, t in tensors.items():
      if any(name.startswith(p) for p in trained):
        tensors[name] = (t + rng.normal(0, 0.05, t.shape)).astype(t.dtype)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    dirs.append(out)
  return dirs


def full_finetune(base_dir: str, out_dir: str, std: float = 0.02, seed: int = 1) -> str:
  """An HF checkpoint where every tensor of the base (embedding, norms, every layer, head)
  moved by Gaussian noise of `std` times its own RMS: a full fine-tune's shape of change."""
  import shutil
  import numpy as np
  from safetensors.numpy import load_file, save_file
  shutil.copytree(base_dir, out_dir)
  tensors = load_file(os.path.join(base_dir, "model.safetensors"))
  rng = np.random.default_rng(seed)
  for name, t in tensors.items():
    rms = float(np.sqrt(np.mean(np.square(t.astype(np.float64))))) or 1.0
    tensors[name] = (t + rng.normal(0, std * rms, t.shape)).astype(t.dtype)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  return out_dir


def build(name: str, out_dir: str, seed: int = 0) -> tuple[str, "transformers.PreTrainedModel"]:
  """Saves a tiny random model `name` into out_dir; returns (dir, the torch model in eval mode)."""
  cls_name, kwargs = CONFIGS[name]
  config = getattr(transformers, cls_name)(**kwargs)
  torch.manual_seed(seed)
  # torch's grouped_mm needs 16-byte strides (not our prime widths): use the per-expert loop.
  extra = {"experts_implementation": "eager"} if "Moe" in cls_name or "Mixtral" in cls_name else {}
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra).eval()
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir)
  return out_dir, model
