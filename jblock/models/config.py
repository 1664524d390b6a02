"""Model configuration shared by every family, and the per-block compute configs derived from it."""

import dataclasses
import json
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str  # "llama" (Llama, Mistral, Qwen2) or "gpt2"
  architecture: str  # the HF architecture name the checkpoint declared
  vocab_size: int  # rows of the embedding table and columns of the LM head
  hidden_size: int  # width of the residual stream
  num_layers: int  # decoder layers
  num_heads: int  # query heads
  num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
  head_dim: int  # width of one attention head
  intermediate_size: int  # MLP hidden width
  norm: str  # "rms" (no bias) or "layer" (LayerNorm with bias)
  norm_eps: float  # epsilon inside the norms
  mlp: str  # "gated" (SwiGLU-style gate/up/down) or "plain" (fc -> act -> proj)
  activation: str  # one of models.layers.ACTIVATIONS
  qkv_bias: bool  # biases on the q, k, v projections
  o_bias: bool  # bias on the attention output projection
  mlp_bias: bool  # biases on the MLP projections
  rope: dict[str, Any] | None  # RoPE parameters (rope_type, rope_theta, ...); None = learned positions
  max_position_embeddings: int  # longest sequence the model supports
  learned_positions: bool  # GPT-2 style absolute position table in the embed block
  tie_word_embeddings: bool  # the head uses the embedding table
  sliding_windows: tuple[int, ...]  # per layer: attention window (0 = full attention)
  eos_token_ids: tuple[int, ...] = ()  # from the HF config; serving stops on them by default

  @property
  def attn_scale(self) -> float:
    return 1.0 / math.sqrt(self.head_dim)

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    d["sliding_windows"] = tuple(d["sliding_windows"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
    return cls(**d)

  # Block compute configs: exactly the fields that change a block's math (they are hashed).

  def embed_config(self) -> dict[str, Any]:
    return {"family": self.family, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "learned_positions": self.learned_positions}

  def layers_config(self, first: int, count: int) -> dict[str, Any]:
    return {
        "family": self.family, "num_layers": count, "hidden_size": self.hidden_size,
        "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
        "intermediate_size": self.intermediate_size, "norm": self.norm, "norm_eps": self.norm_eps,
        "mlp": self.mlp, "activation": self.activation, "qkv_bias": self.qkv_bias,
        "o_bias": self.o_bias, "mlp_bias": self.mlp_bias, "rope": self.rope,
        "sliding_windows": list(self.sliding_windows[first:first + count]),
    }

  def head_config(self, tied_to: str | None) -> dict[str, Any]:
    # tied_to is the embedding block's id: the head's math depends on that table.
    return {"family": self.family, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "norm": self.norm, "norm_eps": self.norm_eps, "tied_to": tied_to}

  def layer_groups(self, layers_per_block: int) -> list[tuple[int, int]]:
    """(first layer, count) per layers block: ceil(L / k) groups."""
    if layers_per_block < 1:
      raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")
    return [(i, min(layers_per_block, self.num_layers - i))
            for i in range(0, self.num_layers, layers_per_block)]
