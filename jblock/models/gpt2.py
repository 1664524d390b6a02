"""GPT-2 family: GPT2LMHeadModel (learned positions, LayerNorm, fused c_attn, tied head)."""

from typing import Any

from jblock.errors import UnsupportedModelError
from jblock.models.config import ModelConfig
from jblock.models.llama import _ids

ARCHITECTURES = ("GPT2LMHeadModel",)


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
  for switch in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
    if hf.get(switch):
      raise UnsupportedModelError(f"GPT-2 config switch {switch}=True is not supported")
  if hf.get("scale_attn_weights") is False:
    raise UnsupportedModelError("GPT-2 config switch scale_attn_weights=False is not supported")
  d, heads = hf["n_embd"], hf["n_head"]
  return ModelConfig(
      family="gpt2",
      architecture=arch,
      vocab_size=hf["vocab_size"],
      hidden_size=d,
      num_layers=hf["n_layer"],
      num_heads=heads,
      num_kv_heads=heads,
      head_dim=d // heads,
      intermediate_size=hf.get("n_inner") or 4 * d,
      norm="layer",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      mlp="plain",
      activation=hf.get("activation_function", "gelu_new"),
      qkv_bias=True,
      o_bias=True,
      mlp_bias=True,
      rope=None,
      max_position_embeddings=hf["n_positions"],
      learned_positions=True,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
      sliding_windows=(0,) * hf["n_layer"],
      eos_token_ids=_ids(hf.get("eos_token_id")),
  )
