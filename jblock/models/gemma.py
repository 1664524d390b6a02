"""Gemma family: Gemma2ForCausalLM, Gemma3ForCausalLM (text).

What differs from Llama: embeddings scaled by sqrt(hidden), (1 + w) RMSNorms, norms after
attention and MLP too, GeGLU (tanh GELU), attention scale from `query_pre_attn_scalar`,
attention and final logit soft-capping, sliding-window layers from `layer_types`; Gemma 3 adds
q/k norms and a RoPE of its own (`rope_local_base_freq`) for the sliding layers.
"""

from typing import Any

from jblock.errors import UnsupportedModelError
from jblock.models.config import ModelConfig
from jblock.models.llama import decoder_config, rope_from_hf
from jblock.models.rope import rope_from_params

ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def _layer_types(hf: dict[str, Any], arch: str) -> list[str]:
  n = hf["num_hidden_layers"]
  if hf.get("layer_types"):
    return list(hf["layer_types"])
  if arch == "Gemma2ForCausalLM":  # older configs: sliding on even layers
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
  pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
  return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


def _ropes(hf: dict[str, Any], arch: str, head_dim: int):
  """(global rope, local rope or None)."""
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params or "sliding_attention" in params:
    full = rope_from_params(params.get("full_attention"), hf, head_dim)
    local = rope_from_params(params.get("sliding_attention") or params.get("full_attention"), hf,
                             head_dim)
  else:
    full = rope_from_hf(hf, head_dim)
    local = None
    if arch == "Gemma3ForCausalLM":  # older Gemma 3 configs
      local = {"rope_type": "default", "rope_theta": float(hf.get("rope_local_base_freq", 10000.0))}
  return full, (local if local != full else None)


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
  if hf.get("use_bidirectional_attention"):
    raise UnsupportedModelError("Gemma 3 use_bidirectional_attention=True (an encoder) is not "
                                "supported")
  head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  rope, local_rope = _ropes(hf, arch, head_dim)
  window = int(hf.get("sliding_window") or 0)
  windows = tuple(window if t == "sliding_attention" else 0 for t in _layer_types(hf, arch))
  return decoder_config(
      hf, arch, "gemma",
      rope=rope,
      local_rope=local_rope,
      norm="gemma_rms",
      activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
      sliding_windows=windows,
      qk_norm=arch == "Gemma3ForCausalLM",
      sandwich_norm=True,
      embed_scale=True,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
      attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
      final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
  )
