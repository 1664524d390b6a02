"""Model families written as blocks (embed, layers, head)."""

from typing import Any

from jblock.errors import UnsupportedModelError
from jblock.models import gemma, gpt2, llama, moe_family, phi3
from jblock.models.config import ModelConfig
from jblock.models.layers import ACTIVATIONS

FAMILIES = {arch: module for module in (llama, gemma, phi3, moe_family, gpt2)
            for arch in module.ARCHITECTURES}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """ModelConfig from a Hugging Face config.json dict; unsupported models raise a clear error."""
  archs = hf.get("architectures") or []
  if len(archs) != 1 or archs[0] not in FAMILIES:
    hint = (" (multi-head latent attention is not implemented)"
            if hf.get("kv_lora_rank") or hf.get("q_lora_rank") else "")
    raise UnsupportedModelError(
        f"unsupported architecture {archs or hf.get('model_type')!r}{hint}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  config = FAMILIES[archs[0]].config_from_hf(hf, archs[0])
  if config.activation not in ACTIVATIONS:
    raise UnsupportedModelError(
        f"activation {config.activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
  if config.num_heads % config.num_kv_heads:
    raise UnsupportedModelError(
        f"num_attention_heads={config.num_heads} is not a multiple of "
        f"num_key_value_heads={config.num_kv_heads}")
  return config
