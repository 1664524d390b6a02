"""Declarative HF -> jblock parameter mapping tables, one per family.

A rule maps one HF tensor to one or more params of a block. `{i}` in an HF name is the global
layer index; `{L}` in a param path is the layer's attribute inside its layers block; `{j}` is an
expert index: the rule's tensors of every expert are stacked on a leading expert axis. Every
transform has an inverse, so the same table exports blocks back to an HF checkpoint.
"""

import dataclasses
from typing import Callable

import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS

_L = "model.layers.{i}"
from jblock.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  forward: Callable[[np.ndarray], list[np.ndarray]]  # HF tensor -> param values
  inverse: Callable[[list[np.ndarray]], np.ndarray]  # param values -> HF tensor


IDENTITY = Transform("identity", lambda x: [x], lambda xs: xs[0])
# torch nn.Linear stores [out, in]; jblock kernels are [in, out].
TRANSPOSE = Transform("transpose", lambda x: [x.T], lambda xs: xs[0].T)
# GPT-2's fused c_attn (Conv1D, already [in, out]) holds q | k | v side by side.
SPLIT_QKV = Transform("split_qkv", lambda x: np.split(x, 3, axis=-1),
                      lambda xs: np.concatenate(xs, axis=-1))


def split_rows_transposed(sizes: tuple[int, ...]) -> Transform:
  """A fused torch Linear weight [sum(sizes), in] (Phi-3 qkv_proj, gate_up_proj) -> one [in, size]
  kernel per part."""
  cuts = list(np.cumsum(sizes)[:-1])
  return Transform(f"split_rows_transposed{tuple(sizes)}",
                   lambda x: [p.T for p in np.split(x, cuts, axis=0)],
                   lambda xs: np.concatenate([p.T for p in xs], axis=0))


def _always(_: ModelConfig) -> bool:
  return True


@dataclasses.dataclass(frozen=True)
class Rule:
  hf_name: str  # HF tensor name, `{i}` = layer index
  kind: str  # block kind the params go to
  paths: tuple[str, ...]  # '/'-separated param paths in the block, `{L}` = layer attribute
  transform: Transform = IDENTITY
  when: Callable[[ModelConfig], bool] = _always  # the rule applies to configs where this holds
  layer_when: Callable[[ModelConfig, int], bool] | None = None  # and to the layers where this holds

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name

  @property
  def per_expert(self) -> bool:
    return "{j}" in self.hf_name

  def applies_to_layer(self, config: ModelConfig, layer: int) -> bool:
    return self.layer_when is None or self.layer_when(config, layer)


def _linear(hf: str, path: str, bias: Callable[[ModelConfig], bool] = lambda c: False,
            layer_when=None) -> list[Rule]:
  return [Rule(f"{hf}.weight", LAYERS, (f"{{L}}/{path}/kernel",), TRANSPOSE, layer_when=layer_when),
          Rule(f"{hf}.bias", LAYERS, (f"{{L}}/{path}/bias",), when=bias, layer_when=layer_when)]


def _qk_norms() -> list[Rule]:
  qk = lambda c: c.qk_norm
  return [Rule(f"{_L}.self_attn.q_norm.weight", LAYERS, ("{L}/attn/q_norm/scale",), when=qk),
          Rule(f"{_L}.self_attn.k_norm.weight", LAYERS, ("{L}/attn/k_norm/scale",), when=qk)]


def _attention() -> list[Rule]:
  return [*_linear(f"{_L}.self_attn.q_proj", "attn/q", lambda c: c.qkv_bias),
          *_linear(f"{_L}.self_attn.k_proj", "attn/k", lambda c: c.qkv_bias),
          *_linear(f"{_L}.self_attn.v_proj", "attn/v", lambda c: c.qkv_bias),
          *_linear(f"{_L}.self_attn.o_proj", "attn/o", lambda c: c.o_bias),
          *_qk_norms()]


def _dense_mlp(prefix: str = "mlp", layer_when=None) -> list[Rule]:
  return [*_linear(f"{_L}.{prefix}.gate_proj", "mlp/gate", lambda c: c.mlp_bias, layer_when),
          *_linear(f"{_L}.{prefix}.up_proj", "mlp/up", lambda c: c.mlp_bias, layer_when),
          *_linear(f"{_L}.{prefix}.down_proj", "mlp/down", lambda c: c.mlp_bias, layer_when)]


_HEAD_RULES = [
    Rule("model.norm.weight", HEAD, ("norm/scale",)),
    Rule("lm_head.weight", HEAD, ("lm_head",), TRANSPOSE, when=lambda c: not c.tie_word_embeddings),
]


LLAMA_RULES: list[Rule] = [
    Rule("model.embed_tokens.weight", EMBED, ("embedding",)),
    Rule(f"{_L}.input_layernorm.weight", LAYERS, ("{L}/attn_norm/scale",)),
    *_attention(),
    Rule(f"{_L}.post_attention_layernorm.weight", LAYERS, ("{L}/mlp_norm/scale",)),
    *_dense_mlp(),
    *_HEAD_RULES,
]

# Gemma: post_attention_layernorm is the norm *after* attention; pre_feedforward_layernorm is
# the MLP's input norm.
GEMMA_RULES: list[Rule] = [
    Rule("model.embed_tokens.weight", EMBED, ("embedding",)),
    Rule(f"{_L}.input_layernorm.weight", LAYERS, ("{L}/attn_norm/scale",)),
    *_attention(),
    Rule(f"{_L}.post_attention_layernorm.weight", LAYERS, ("{L}/post_attn_norm/scale",)),
    Rule(f"{_L}.pre_feedforward_layernorm.weight", LAYERS, ("{L}/mlp_norm/scale",)),
    *_dense_mlp(),
    Rule(f"{_L}.post_feedforward_layernorm.weight", LAYERS, ("{L}/post_mlp_norm/scale",)),
    *_HEAD_RULES,
]


def phi3_rules(c: ModelConfig) -> list[Rule]:
  qkv = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim)
  return [
      Rule("model.embed_tokens.weight", EMBED, ("embedding",)),
      Rule(f"{_L}.input_layernorm.weight", LAYERS, ("{L}/attn_norm/scale",)),
      Rule(f"{_L}.self_attn.qkv_proj.weight", LAYERS,
           ("{L}/attn/q/kernel", "{L}/attn/k/kernel", "{L}/attn/v/kernel"),
           split_rows_transposed(qkv)),
      *_linear(f"{_L}.self_attn.o_proj", "attn/o"),
      Rule(f"{_L}.post_attention_layernorm.weight", LAYERS, ("{L}/mlp_norm/scale",)),
      Rule(f"{_L}.mlp.gate_up_proj.weight", LAYERS, ("{L}/mlp/gate/kernel", "{L}/mlp/up/kernel"),
           split_rows_transposed((c.intermediate_size, c.intermediate_size))),
      *_linear(f"{_L}.mlp.down_proj", "mlp/down"),
      *_HEAD_RULES,
  ]


_moe_layer = lambda c, i: c.is_moe_layer(i)
_dense_layer = lambda c, i: not c.is_moe_layer(i)
_mixtral = lambda c: c.architecture == "MixtralForCausalLM"
_qwen_moe = lambda c: c.architecture != "MixtralForCausalLM"
_shared = lambda c: bool(c.moe and c.moe["shared_size"])


def _experts(prefix: str, names: tuple[str, str, str], when) -> list[Rule]:
  """Per-expert gate / up / down tensors, stacked into mlp/experts/{gate,up,down} [E, ...]."""
  return [Rule(f"{_L}.{prefix}.experts.{{j}}.{hf}.weight", LAYERS, (f"{{L}}/mlp/experts/{ours}",),
               TRANSPOSE, when=when, layer_when=_moe_layer)
          for hf, ours in zip(names, ("gate", "up", "down"))]


MOE_RULES: list[Rule] = [
    Rule("model.embed_tokens.weight", EMBED, ("embedding",)),
    Rule(f"{_L}.input_layernorm.weight", LAYERS, ("{L}/attn_norm/scale",)),
    *_attention(),
    Rule(f"{_L}.post_attention_layernorm.weight", LAYERS, ("{L}/mlp_norm/scale",)),
    Rule(f"{_L}.block_sparse_moe.gate.weight", LAYERS, ("{L}/mlp/router/kernel",), TRANSPOSE,
         when=_mixtral, layer_when=_moe_layer),
    *_experts("block_sparse_moe", ("w1", "w3", "w2"), _mixtral),
    Rule(f"{_L}.mlp.gate.weight", LAYERS, ("{L}/mlp/router/kernel",), TRANSPOSE, when=_qwen_moe,
         layer_when=_moe_layer),
    *_experts("mlp", ("gate_proj", "up_proj", "down_proj"), _qwen_moe),
    *[dataclasses.replace(r, when=_shared, layer_when=_moe_layer) for r in
      _linear(f"{_L}.mlp.shared_expert.gate_proj", "mlp/shared/gate")[:1] +
      _linear(f"{_L}.mlp.shared_expert.up_proj", "mlp/shared/up")[:1] +
      _linear(f"{_L}.mlp.shared_expert.down_proj", "mlp/shared/down")[:1] +
      _linear(f"{_L}.mlp.shared_expert_gate", "mlp/shared_gate")[:1]],
    *_dense_mlp(layer_when=_dense_layer),
    *_HEAD_RULES,
]

_H = "transformer.h.{i}"
GPT2_RULES: list[Rule] = [
    Rule("transformer.wte.weight", EMBED, ("embedding",)),
    Rule("transformer.wpe.weight", EMBED, ("position_embedding",)),
    Rule(f"{_H}.ln_1.weight", LAYERS, ("{L}/attn_norm/scale",)),
    Rule(f"{_H}.ln_1.bias", LAYERS, ("{L}/attn_norm/bias",)),
    Rule(f"{_H}.attn.c_attn.weight", LAYERS,
         ("{L}/attn/q/kernel", "{L}/attn/k/kernel", "{L}/attn/v/kernel"), SPLIT_QKV),
    Rule(f"{_H}.attn.c_attn.bias", LAYERS,
         ("{L}/attn/q/bias", "{L}/attn/k/bias", "{L}/attn/v/bias"), SPLIT_QKV),
    # Conv1D weights are already [in, out].
    Rule(f"{_H}.attn.c_proj.weight", LAYERS, ("{L}/attn/o/kernel",)),
    Rule(f"{_H}.attn.c_proj.bias", LAYERS, ("{L}/attn/o/bias",)),
    Rule(f"{_H}.ln_2.weight", LAYERS, ("{L}/mlp_norm/scale",)),
    Rule(f"{_H}.ln_2.bias", LAYERS, ("{L}/mlp_norm/bias",)),
    Rule(f"{_H}.mlp.c_fc.weight", LAYERS, ("{L}/mlp/fc/kernel",)),
    Rule(f"{_H}.mlp.c_fc.bias", LAYERS, ("{L}/mlp/fc/bias",)),
    Rule(f"{_H}.mlp.c_proj.weight", LAYERS, ("{L}/mlp/proj/kernel",)),
    Rule(f"{_H}.mlp.c_proj.bias", LAYERS, ("{L}/mlp/proj/bias",)),
    Rule("transformer.ln_f.weight", HEAD, ("norm/scale",)),
    Rule("transformer.ln_f.bias", HEAD, ("norm/bias",)),
    Rule("lm_head.weight", HEAD, ("lm_head",), TRANSPOSE, when=lambda c: not c.tie_word_embeddings),
]

RULES = {"llama": LLAMA_RULES, "gemma": GEMMA_RULES, "phi3": phi3_rules, "moe": MOE_RULES,
         "gpt2": GPT2_RULES}

# HF tensors that carry no weights (buffers some checkpoints still save).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def rules_for(config: ModelConfig) -> list[Rule]:
  table = RULES[config.family]
  return [r for r in (table(config) if callable(table) else table) if r.when(config)]
