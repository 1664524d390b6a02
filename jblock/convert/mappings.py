"""Declarative HF -> jblock parameter mapping tables, one per family.

A rule maps one HF tensor to one or more params of a block. `{i}` in an HF name is the global
layer index; `{L}` in a param path is the layer's attribute inside its layers block. Every
transform has an inverse, so the same table exports blocks back to an HF checkpoint.
"""

import dataclasses
from typing import Callable

import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS
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


def _always(_: ModelConfig) -> bool:
  return True


@dataclasses.dataclass(frozen=True)
class Rule:
  hf_name: str  # HF tensor name, `{i}` = layer index
  kind: str  # block kind the params go to
  paths: tuple[str, ...]  # '/'-separated param paths in the block, `{L}` = layer attribute
  transform: Transform = IDENTITY
  when: Callable[[ModelConfig], bool] = _always  # the rule applies to configs where this holds

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_name


def _linear(hf: str, path: str, bias: Callable[[ModelConfig], bool]) -> list[Rule]:
  return [Rule(f"{hf}.weight", LAYERS, (f"{{L}}/{path}/kernel",), TRANSPOSE),
          Rule(f"{hf}.bias", LAYERS, (f"{{L}}/{path}/bias",), when=bias)]


_L = "model.layers.{i}"
LLAMA_RULES: list[Rule] = [
    Rule("model.embed_tokens.weight", EMBED, ("embedding",)),
    Rule(f"{_L}.input_layernorm.weight", LAYERS, ("{L}/attn_norm/scale",)),
    *_linear(f"{_L}.self_attn.q_proj", "attn/q", lambda c: c.qkv_bias),
    *_linear(f"{_L}.self_attn.k_proj", "attn/k", lambda c: c.qkv_bias),
    *_linear(f"{_L}.self_attn.v_proj", "attn/v", lambda c: c.qkv_bias),
    *_linear(f"{_L}.self_attn.o_proj", "attn/o", lambda c: c.o_bias),
    Rule(f"{_L}.post_attention_layernorm.weight", LAYERS, ("{L}/mlp_norm/scale",)),
    *_linear(f"{_L}.mlp.gate_proj", "mlp/gate", lambda c: c.mlp_bias),
    *_linear(f"{_L}.mlp.up_proj", "mlp/up", lambda c: c.mlp_bias),
    *_linear(f"{_L}.mlp.down_proj", "mlp/down", lambda c: c.mlp_bias),
    Rule("model.norm.weight", HEAD, ("norm/scale",)),
    Rule("lm_head.weight", HEAD, ("lm_head",), TRANSPOSE, when=lambda c: not c.tie_word_embeddings),
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

RULES = {"llama": LLAMA_RULES, "gpt2": GPT2_RULES}

# HF tensors that carry no weights (buffers some checkpoints still save).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def rules_for(config: ModelConfig) -> list[Rule]:
  return [r for r in RULES[config.family] if r.when(config)]
