"""Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (one model, config switches)."""

from typing import Any

from jblock.errors import UnsupportedModelError
from jblock.models.config import ModelConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3")


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """RoPE parameters from either transformers>=5 `rope_parameters` or older `rope_scaling`."""
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  if "type" in rope and "rope_type" not in rope:
    rope["rope_type"] = rope.pop("type")
  rope.setdefault("rope_type", "default")
  rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  if rope["rope_type"] not in ROPE_TYPES:
    raise UnsupportedModelError(
        f"rope_type {rope['rope_type']!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
  keep = {"default": (), "linear": ("factor",),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")}[rope["rope_type"]]
  out = {"rope_type": rope["rope_type"], "rope_theta": float(rope["rope_theta"])}
  for key in keep:
    if key not in rope:
      raise UnsupportedModelError(f"rope_type {rope['rope_type']!r} needs {key!r} in the config")
    out[key] = float(rope[key]) if key != "original_max_position_embeddings" else int(rope[key])
  return out


def sliding_windows_from_hf(hf: dict[str, Any], arch: str, num_layers: int) -> tuple[int, ...]:
  window = hf.get("sliding_window") or 0
  if arch == "Qwen2ForCausalLM":
    if not hf.get("use_sliding_window", False):
      return (0,) * num_layers
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", num_layers) else "full_attention"
        for i in range(num_layers)]
    return tuple(window if t == "sliding_attention" else 0 for t in types)
  if arch == "MistralForCausalLM":
    return (int(window),) * num_layers
  return (0,) * num_layers


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
  heads = hf["num_attention_heads"]
  num_layers = hf["num_hidden_layers"]
  qwen = arch == "Qwen2ForCausalLM"
  attention_bias = bool(hf.get("attention_bias", False))
  return ModelConfig(
      family="llama",
      architecture=arch,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      intermediate_size=hf["intermediate_size"],
      norm="rms",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      mlp="gated",
      activation=hf.get("hidden_act", "silu"),
      qkv_bias=qwen or attention_bias,  # Qwen2 always has q/k/v biases
      o_bias=attention_bias and not qwen,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      rope=rope_from_hf(hf),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      learned_positions=False,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      sliding_windows=sliding_windows_from_hf(hf, arch, num_layers),
      eos_token_ids=_ids(hf.get("eos_token_id")),
  )


def _ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(value) if isinstance(value, list) else (int(value),)
