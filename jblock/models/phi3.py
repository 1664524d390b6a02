"""Phi-3 family: Phi3ForCausalLM. Llama's math with fused `qkv_proj` / `gate_up_proj` tensors
(split by the mapping table), partial rotary and LongRoPE where the config has them.

LongRoPE generations: transformers' Phi-3 `generate` drops its cache at the step whose sequence
first exceeds `original_max_position_embeddings` and runs the whole sequence again (then with
the long factors). The RoPE config says so (`rerun_past_original`), and jblock does the same
(jblock.models.rope.rerun_length).
"""

from typing import Any

from jblock.models.config import ModelConfig
from jblock.models.llama import decoder_config, rope_from_hf

ARCHITECTURES = ("Phi3ForCausalLM",)


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
  head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  rope = rope_from_hf(hf, head_dim, partial_ok=True)
  if rope["rope_type"] == "longrope":  # with other types the re-run computes the same KV
    rope["rerun_past_original"] = True
  return decoder_config(hf, arch, "phi3", rope=rope,
                        o_bias=False, qkv_bias=False, mlp_bias=False)
