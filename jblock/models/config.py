"""Model configuration shared by every family, and the per-block compute configs derived from it."""

import dataclasses
import json
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str  # "llama" (Llama, Mistral, Qwen2, Qwen3), "gemma", "phi3", "moe" or "gpt2"
  architecture: str  # the HF architecture name the checkpoint declared
  vocab_size: int  # rows of the embedding table and columns of the LM head
  hidden_size: int  # width of the residual stream
  num_layers: int  # decoder layers
  num_heads: int  # query heads
  num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
  head_dim: int  # width of one attention head
  intermediate_size: int  # MLP hidden width
  norm: str  # "rms" (no bias), "gemma_rms" (scaled by 1 + w) or "layer" (LayerNorm with bias)
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
  qk_norm: bool = False  # a norm over each head's q and k before RoPE (Qwen3, Gemma 3)
  sandwich_norm: bool = False  # norms after attention and after the MLP too (Gemma 2/3)
  embed_scale: bool = False  # embeddings times sqrt(hidden_size), in their dtype (Gemma)
  query_pre_attn_scalar: float = 0.0  # attention scale = this ** -0.5 (Gemma); 0: head_dim
  attn_softcap: float = 0.0  # attention logits soft-capped to c * tanh(s / c); 0 = off
  final_softcap: float = 0.0  # LM-head logits soft-capped likewise (Gemma 2); 0 = off
  local_rope: dict[str, Any] | None = None  # RoPE of sliding-window layers (Gemma 3); None: `rope`
  moe: dict[str, Any] | None = None  # mixture-of-experts MLP (keys: jblock.models.moe); None = dense
  moe_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense MLP; () = all MoE if `moe`

  @property
  def attn_scale(self) -> float:
    if self.query_pre_attn_scalar:
      return self.query_pre_attn_scalar ** -0.5
    return 1.0 / math.sqrt(self.head_dim)

  def is_moe_layer(self, layer: int) -> bool:
    return bool(self.moe) and (self.moe_layers[layer] if self.moe_layers else True)

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    d["sliding_windows"] = tuple(d["sliding_windows"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
    d["moe_layers"] = tuple(d.get("moe_layers", ()))
    return cls(**d)

  # Block compute configs: exactly the fields that change a block's math (they are hashed).

  def embed_config(self) -> dict[str, Any]:
    cfg = {"family": self.family, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
           "learned_positions": self.learned_positions}
    if self.embed_scale:
      cfg["embed_scale"] = True
    return cfg

  def layers_config(self, first: int, count: int) -> dict[str, Any]:
    cfg = {
        "family": self.family, "num_layers": count, "hidden_size": self.hidden_size,
        "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
        "intermediate_size": self.intermediate_size, "norm": self.norm, "norm_eps": self.norm_eps,
        "mlp": self.mlp, "activation": self.activation, "qkv_bias": self.qkv_bias,
        "o_bias": self.o_bias, "mlp_bias": self.mlp_bias, "rope": self.rope,
        "sliding_windows": list(self.sliding_windows[first:first + count]),
    }
    # Switches of the newer families appear only when set, so older families' ids stay put.
    for key in ("qk_norm", "sandwich_norm", "query_pre_attn_scalar", "attn_softcap",
                "local_rope", "moe"):
      if getattr(self, key):
        cfg[key] = getattr(self, key)
    if self.moe and self.moe_layers:
      cfg["moe_layers"] = list(self.moe_layers[first:first + count])
    return cfg

  def head_config(self, tied_to: str | None) -> dict[str, Any]:
    # tied_to is the embedding block's id: the head's math depends on that table.
    cfg = {"family": self.family, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
           "norm": self.norm, "norm_eps": self.norm_eps, "tied_to": tied_to}
    if self.final_softcap:
      cfg["final_softcap"] = self.final_softcap
    return cfg

  def layer_groups(self, layers_per_block: int) -> list[tuple[int, int]]:
    """(first layer, count) per layers block: ceil(L / k) groups."""
    if layers_per_block < 1:
      raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")
    return [(i, min(layers_per_block, self.num_layers - i))
            for i in range(0, self.num_layers, layers_per_block)]
