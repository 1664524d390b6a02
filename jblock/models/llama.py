"""Llama family: Llama, Mistral, Qwen2, Qwen3 (one model, config switches).

`decoder_config` is the shared parser the other RoPE families (Gemma, Phi-3, MoE) start from.
"""

import dataclasses
from typing import Any

from jblock.models.config import ModelConfig
from jblock.models.rope import rope_from_params

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def rope_from_hf(hf: dict[str, Any], head_dim: int, partial_ok: bool = False) -> dict[str, Any]:
  """RoPE parameters from either transformers>=5 `rope_parameters` or older `rope_scaling`."""
  return rope_from_params(hf.get("rope_parameters") or hf.get("rope_scaling"), hf, head_dim,
                          partial_ok)


def layer_types_windows(hf: dict[str, Any], num_layers: int, default_type: str) -> tuple[int, ...]:
  """Per-layer windows from `layer_types` ("sliding_attention" layers get `sliding_window`)."""
  window = int(hf.get("sliding_window") or 0)
  types = hf.get("layer_types") or [default_type] * num_layers
  return tuple(window if t == "sliding_attention" else 0 for t in types)


def sliding_windows_from_hf(hf: dict[str, Any], arch: str, num_layers: int) -> tuple[int, ...]:
  window = hf.get("sliding_window") or 0
  if arch in _QWEN:
    if not hf.get("use_sliding_window", False):
      return (0,) * num_layers
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", num_layers) else "full_attention"
        for i in range(num_layers)]
    return tuple(window if t == "sliding_attention" else 0 for t in types)
  if arch in ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM"):
    return (int(window),) * num_layers
  return (0,) * num_layers


def decoder_config(hf: dict[str, Any], arch: str, family: str, **overrides) -> ModelConfig:
  """The RoPE decoder fields every family shares, then the family's overrides."""
  heads = hf["num_attention_heads"]
  num_layers = hf["num_hidden_layers"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  attention_bias = bool(hf.get("attention_bias", False))
  qkv_bias_always = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")  # Qwen2: q/k/v biases
  config = ModelConfig(
      family=family,
      architecture=arch,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=head_dim,
      intermediate_size=hf.get("intermediate_size") or 0,
      norm="rms",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      mlp="gated",
      activation=hf.get("hidden_act", "silu"),
      qkv_bias=qkv_bias_always or attention_bias,
      o_bias=attention_bias and not qkv_bias_always,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      rope=overrides.pop("rope", None) or rope_from_hf(hf, head_dim),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      learned_positions=False,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      sliding_windows=sliding_windows_from_hf(hf, arch, num_layers),
      eos_token_ids=_ids(hf.get("eos_token_id")),
      qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
  )
  return dataclasses.replace(config, **overrides)


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
  return decoder_config(hf, arch, "llama")


def _ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(value) if isinstance(value, list) else (int(value),)
