"""Small base models and their fine-tuned variants, written as Hugging Face checkpoints.

`init_base` makes a new randomly initialised model (numpy, fixed seed, no torch) that
transformers loads as-is; `make_variants` fine-tunes N copies of a base on distinct data
(partial: only the top K layers, or full) and writes each as an HF checkpoint with the base's
tokenizer files and a lineage record. Partial variants keep the base's other tensors
bit-identical, so the zoo stores those blocks once.
"""

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Sequence

import numpy as np

from jblock import models
from jblock.blocks import EMBED, HEAD, LAYERS, Block, flat_leaves
from jblock.convert.hf import abstract_params, convert, export
from jblock.train.finetune import TrainConfig, train

FAMILIES = ("llama", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "gpt2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
LINEAGE_FILE = "lineage.json"


@dataclasses.dataclass(frozen=True)
class BaseSpec:
  """Sizes of a new base model; field names are the keys of --init_config."""
  family: str = "llama"  # one of FAMILIES (llama: LlamaForCausalLM, gpt2: GPT2LMHeadModel, ...)
  hidden: int = 64
  layers: int = 4
  heads: int = 4
  kv_heads: int = 0  # 0 = heads (multi-head attention); llama only
  vocab: int = 257
  intermediate: int = 0  # 0 = the family's usual width (llama ~8/3 hidden, gpt2 4x hidden)
  max_positions: int = 512
  tie: bool = False  # tied embeddings (gpt2 is always tied)
  experts: int = 4  # mixtral: experts per layer (top-2 routing)

  def validate(self) -> None:
    if self.family not in FAMILIES:
      raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
    for name in ("hidden", "layers", "heads", "vocab", "max_positions"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.hidden % self.heads:
      raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}")
    kv = self.kv_heads or self.heads
    if kv < 1 or self.heads % kv or (self.family == "gpt2" and kv != self.heads):
      raise ValueError(f"kv_heads={self.kv_heads} must divide heads={self.heads} (gpt2: equal)")
    if self.intermediate < 0:
      raise ValueError(f"intermediate must be >= 0, got {self.intermediate}")


def parse_init_config(text: str) -> BaseSpec:
  """'family:llama,hidden:64,layers:4,...' -> BaseSpec; unknown keys and bad values raise ValueError."""
  fields = {f.name: f for f in dataclasses.fields(BaseSpec)}
  values: dict[str, Any] = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, raw = item.partition(":")
    key = key.strip()
    if not sep or key not in fields:
      raise ValueError(f"bad item {item!r}: expected key:value with key one of {', '.join(fields)}")
    kind = type(fields[key].default)
    try:
      if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
          raise ValueError(raw)
        values[key] = raw.lower() in ("true", "1")
      else:
        values[key] = kind(raw)
    except ValueError:
      raise ValueError(f"{key}: expected {kind.__name__}, got {raw!r}") from None
  spec = BaseSpec(**values)
  spec.validate()
  return spec


def hf_config_for(spec: BaseSpec, eos_token_id: int | None = None,
                  bos_token_id: int | None = None) -> dict[str, Any]:
  """A config.json dict transformers loads (every field jblock reads is explicit)."""
  common = {"vocab_size": spec.vocab, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None,
            "dtype": "float32", "transformers_version": "5.23.0"}
  if spec.family == "gpt2":
    return {**common, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_embd": spec.hidden, "n_layer": spec.layers, "n_head": spec.heads,
            "n_positions": spec.max_positions, "n_inner": spec.intermediate or None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False,
            "tie_word_embeddings": True}
  intermediate = spec.intermediate or -(-8 * spec.hidden // 3 // 8) * 8  # ~8/3 d, multiple of 8
  if spec.family != "llama":
    return _newer_family_config(spec, common, intermediate)
  return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "hidden_size": spec.hidden, "num_hidden_layers": spec.layers,
          "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads or spec.heads,
          "head_dim": spec.hidden // spec.heads, "intermediate_size": intermediate,
          "hidden_act": "silu", "max_position_embeddings": spec.max_positions,
          "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
          "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
          "pretraining_tp": 1, "tie_word_embeddings": spec.tie}


def _newer_family_config(spec: BaseSpec, common: dict[str, Any], intermediate: int) -> dict[str, Any]:
  """config.json of a qwen3 / gemma2 / gemma3 / phi3 / mixtral base (transformers' field names)."""
  head_dim = spec.hidden // spec.heads
  attn = {**common, "hidden_size": spec.hidden, "num_hidden_layers": spec.layers,
          "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads or spec.heads,
          "head_dim": head_dim, "intermediate_size": intermediate,
          "max_position_embeddings": spec.max_positions, "rms_norm_eps": 1e-6,
          "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": spec.tie,
          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
  window = max(1, spec.max_positions // 4)
  if spec.family == "qwen3":
    return {**attn, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "hidden_act": "silu", "use_sliding_window": False}
  if spec.family == "phi3":
    del attn["head_dim"]
    return {**attn, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
            "sliding_window": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "original_max_position_embeddings": spec.max_positions}
  if spec.family == "mixtral":
    return {**attn, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_act": "silu", "num_local_experts": spec.experts, "num_experts_per_tok": 2,
            "sliding_window": None, "router_jitter_noise": 0.0, "output_router_logits": False}
  gemma = {**attn, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": head_dim,
           "sliding_window": window, "tie_word_embeddings": True}
  if spec.family == "gemma2":
    return {**gemma, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                            for i in range(spec.layers)]}
  return {**gemma, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
          "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                          for i in range(spec.layers)],
          "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}


def _random_params(kind: str, block_config: dict, max_positions: int, rng: np.random.Generator,
                   std: float) -> dict[str, Any]:
  """Norm scales 1, biases 0, every other tensor N(0, std): the usual transformer init."""
  tree: dict[str, Any] = {}
  for path, spec in flat_leaves(abstract_params(kind, block_config, max_positions)):
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "scale":  # a gemma_rms norm scales by 1 + w
      value = (np.zeros if block_config.get("norm") == "gemma_rms" else np.ones)(spec.shape, np.float32)
    elif leaf == "bias":
      value = np.zeros(spec.shape, np.float32)
    else:
      value = (rng.standard_normal(spec.shape) * std).astype(np.float32)
    node = tree
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = value
  return tree


def init_base(spec: BaseSpec, out_dir: str, seed: int = 0, init_std: float = 0.02,
              tokenizer_dir: str | None = None, eos_token_id: int | None = None,
              bos_token_id: int | None = None) -> str:
  """Writes a new randomly initialised base model as an HF checkpoint into out_dir."""
  spec.validate()
  hf_config = hf_config_for(spec, eos_token_id, bos_token_id)
  config = models.config_from_hf(hf_config)
  rng = np.random.default_rng(seed)
  embed = Block(EMBED, config.embed_config(),
                _random_params(EMBED, config.embed_config(), spec.max_positions, rng, init_std))
  blocks = [embed]
  for first, count in config.layer_groups(1):
    cfg = config.layers_config(first, count)
    blocks.append(Block(LAYERS, cfg, _random_params(LAYERS, cfg, spec.max_positions, rng, init_std)))
  head_cfg = config.head_config(embed.id if config.tie_word_embeddings else None)
  blocks.append(Block(HEAD, head_cfg, _random_params(HEAD, head_cfg, spec.max_positions, rng, init_std)))
  export(config, hf_config, blocks, out_dir)
  if tokenizer_dir:
    copy_tokenizer(tokenizer_dir, out_dir)
  return out_dir


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the tokenizer (and generation config) files src_dir has; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src_dir, name)):
      shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
      copied.append(name)
  return copied


def synthetic_stream(vocab: int, length: int, seed: int, cycle: int = 48) -> np.ndarray:
  """A token pattern only this seed produces: one random cycle of distinct tokens, repeated."""
  rng = np.random.default_rng(seed)
  pattern = rng.permutation(vocab)[:min(cycle, vocab)]
  return np.resize(pattern, length).astype(np.int32)


def variant_streams(data, n: int, vocab: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
  """Distinct training data per variant, and a description of each for the lineage.

  data: None (a distinct synthetic pattern per variant), one token sequence (split into n
  contiguous parts), or a list of n token sequences (one per variant).
  """
  if data is None:
    return ([synthetic_stream(vocab, 4096, seed * 1000 + i) for i in range(1, n + 1)],
            [f"synthetic cycle, seed {seed * 1000 + i}" for i in range(1, n + 1)])
  if isinstance(data, (list, tuple)) and data and np.ndim(data[0]) == 1:
    if len(data) != n:
      raise ValueError(f"data holds {len(data)} token sequences for {n} variants")
    streams = [np.asarray(d, np.int32) for d in data]
    descriptions = [f"given sequence {i + 1} of {n}" for i in range(n)]
  else:
    tokens = np.asarray(data, np.int32)
    if tokens.ndim != 1:
      raise ValueError(f"data must be a 1-D token sequence or a list of them, got shape {tokens.shape}")
    streams = list(np.array_split(tokens, n))
    descriptions = [f"corpus part {i + 1} of {n}" for i in range(n)]
  for i, s in enumerate(streams):
    if s.size < 2 or s.min() < 0 or s.max() >= vocab:
      raise ValueError(f"data for variant {i + 1}: needs >= 2 tokens, each in [0, {vocab})")
  return streams, descriptions


def make_variants(base_hf_dir: str, out_dir: str, n: int, trainable_top_layers: int = 1,
                  steps: int = 50, seed: int = 0, full: bool = False, data=None,
                  lr: float = 3e-3, batch_size: int = 8, seq_len: int = 32,
                  data_descriptions: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = print) -> list[str]:
  """Fine-tunes n variants of the base and writes out_dir/variant_{1..n}; returns their dirs.

  Partial (default): only the top `trainable_top_layers` decoder layers are trained; embed,
  lower layers and head stay bit-identical to the base. `full`: every tensor is trained.
  Variant i trains with seed `seed * 1000 + i` on its own data (see `variant_streams`);
  `data_descriptions` (one per variant) name that data in the lineage.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  say = progress or (lambda _: None)
  base = convert(base_hf_dir, "float32", layers_per_block=1)
  streams, descriptions = variant_streams(data, n, base.config.vocab_size, seed)
  if data_descriptions is not None:
    if len(data_descriptions) != n:
      raise ValueError(f"{len(data_descriptions)} data descriptions for {n} variants")
    descriptions = list(data_descriptions)
  dirs = []
  for i in range(1, n + 1):
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                      seed=seed * 1000 + i)
    what = "all blocks" if full else f"top {trainable_top_layers} of {base.config.num_layers} layers"
    say(f"variant {i}/{n}: training {what} for {steps} steps on {descriptions[i - 1]}")
    result = train(base.blocks, streams[i - 1], cfg, trainable_top_layers, full, progress=say)
    variant_dir = os.path.join(out_dir, f"variant_{i}")
    export(base.config, base.hf_config, result.blocks, variant_dir)
    copy_tokenizer(base_hf_dir, variant_dir)
    lineage = {
        "base_hf_dir": os.path.abspath(base_hf_dir),
        "variant": i,
        "kind": "full" if full else "partial",
        "trained_layers": trained_layers(base.blocks, result.trained),
        "trained_blocks": block_names(base.blocks, result.trained),
        "steps": steps, "seed": cfg.seed, "lr": lr, "batch_size": batch_size, "seq_len": seq_len,
        "data": descriptions[i - 1],
        "loss_start": round(result.loss_start, 6), "loss_end": round(result.loss_end, 6),
    }
    with open(os.path.join(variant_dir, LINEAGE_FILE), "w") as f:
      json.dump(lineage, f, indent=2, sort_keys=True)
    say(f"variant {i}/{n}: loss {result.loss_start:.4f} -> {result.loss_end:.4f}, wrote {variant_dir}")
    dirs.append(variant_dir)
  return dirs


def block_names(chain: Sequence[Block], indices: Sequence[int]) -> list[str]:
  """Readable names of chain positions: "embed", "layers.<first layer>", "head"."""
  names, first = [], 0
  for j, b in enumerate(chain):
    name = f"layers.{first}" if b.kind == LAYERS else b.kind
    if j in indices:
      names.append(name)
    first += b.config["num_layers"] if b.kind == LAYERS else 0
  return names


def trained_layers(chain: Sequence[Block], trained: Sequence[int]) -> list[int]:
  """Global decoder-layer indices held by the trained chain positions."""
  layers, first = [], 0
  for j, b in enumerate(chain):
    if b.kind == LAYERS:
      if j in trained:
        layers.extend(range(first, first + b.config["num_layers"]))
      first += b.config["num_layers"]
  return layers
