"""Mixture-of-experts family: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM.

Llama/Qwen attention (Qwen2-MoE: q/k/v biases; Qwen3-MoE: q/k norms) with the MLP of MoE
layers replaced by jblock.models.moe.MoE.
"""

from typing import Any

from jblock.errors import UnsupportedModelError
from jblock.models.config import ModelConfig
from jblock.models.llama import decoder_config

ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
  n = hf["num_hidden_layers"]
  if arch == "MixtralForCausalLM":
    moe = {"num_experts": int(hf["num_local_experts"]), "top_k": int(hf["num_experts_per_tok"]),
           "expert_size": int(hf["intermediate_size"]), "norm_topk_prob": True,
           "weights_in_f32": True, "shared_size": 0}
    moe_layers: tuple[bool, ...] = ()
  else:
    moe = {"num_experts": int(hf.get("num_experts") or hf["num_local_experts"]), "top_k": int(hf["num_experts_per_tok"]),
           "expert_size": int(hf["moe_intermediate_size"]),
           "norm_topk_prob": bool(hf.get("norm_topk_prob", False)), "weights_in_f32": False,
           "shared_size": int(hf.get("shared_expert_intermediate_size") or 0)
           if arch == "Qwen2MoeForCausalLM" else 0}
    step, dense = int(hf.get("decoder_sparse_step") or 1), set(hf.get("mlp_only_layers") or ())
    flags = tuple(i not in dense and (i + 1) % step == 0 for i in range(n))
    moe_layers = () if all(flags) else flags
  if moe["top_k"] > moe["num_experts"]:
    raise UnsupportedModelError(f"num_experts_per_tok={moe['top_k']} exceeds the "
                                f"{moe['num_experts']} experts")
  return decoder_config(hf, arch, "moe", moe=moe, moe_layers=moe_layers)
