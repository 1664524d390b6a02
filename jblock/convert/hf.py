"""Hugging Face checkpoint directory -> jblock blocks, and blocks -> HF checkpoint (for variants)."""

import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import safe_open, save_file

from jblock import models
from jblock.blocks import EMBED, HEAD, LAYERS, Block, flat_leaves
from jblock.convert.mappings import IGNORED_SUFFIXES, Rule, rules_for
from jblock.errors import ConversionError
from jblock.models.blocks import EmbedBlock, HeadBlock, LayersBlock
from jblock.models.config import ModelConfig

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


@dataclasses.dataclass
class Converted:
  config: ModelConfig
  hf_config: dict[str, Any]  # config.json as read; kept so variants can be exported back
  blocks: list[Block]  # the chain: embed, layers..., head


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint directory)")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path}: invalid JSON: {e}") from e


def _tensor_files(hf_dir: str) -> dict[str, str]:
  """Tensor name -> safetensors file that holds it."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(hf_dir, fname) for name, fname in weight_map.items()}
  single = os.path.join(hf_dir, SINGLE_FILE)
  if not os.path.isfile(single):
    raise ConversionError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
  try:
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  except (SafetensorError, OSError) as e:
    raise ConversionError(f"{single}: unreadable safetensors file: {e}") from e


class TensorReader:
  """Reads tensors lazily from one or more safetensors files, with errors naming the tensor."""

  def __init__(self, hf_dir: str):
    self.files = _tensor_files(hf_dir)
    self._open: dict[str, Any] = {}

  def names(self) -> set[str]:
    return set(self.files)

  def read(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise ConversionError(f"missing tensor {name!r} in the checkpoint")
    path = self.files[name]
    try:
      if path not in self._open:
        self._open[path] = safe_open(path, framework="numpy")
      return self._open[path].get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise ConversionError(f"tensor {name!r} in {path} is unreadable: {e}") from e


def abstract_params(kind: str, block_config: dict[str, Any], max_positions: int) -> dict[str, Any]:
  """Expected param shapes of a block, taken from the Flax module itself."""
  make: Callable[[], nnx.Module] = {
      EMBED: lambda: EmbedBlock(block_config, max_positions=max_positions),
      LAYERS: lambda: LayersBlock(block_config),
      HEAD: lambda: HeadBlock(block_config),
  }[kind]
  state = nnx.to_pure_dict(nnx.state(nnx.eval_shape(make)))
  if kind == HEAD and block_config["tied_to"] is not None:
    del state["embedding"]  # the embed block's table, not stored in the head
  return state


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def _placements(config: ModelConfig, rule: Rule, layers_per_block: int) -> Iterator[tuple[str, int, str, int]]:
  """(hf name, block index in chain, path template with {L} resolved, layer) for one rule.
  Per-expert rules keep `{j}` in the name (see _expert_names)."""
  n_layer_blocks = len(config.layer_groups(layers_per_block))
  if not rule.per_layer:
    yield rule.hf_name, (0 if rule.kind == EMBED else n_layer_blocks + 1), "", -1
    return
  for layer in range(config.num_layers):
    if not rule.applies_to_layer(config, layer):
      continue
    yield (rule.hf_name.replace("{i}", str(layer)), 1 + layer // layers_per_block,
           f"layer_{layer % layers_per_block}", layer)


def _expert_names(name: str, config: ModelConfig) -> list[str]:
  if "{j}" not in name:
    return [name]
  return [name.replace("{j}", str(j)) for j in range(config.moe["num_experts"])]


def convert(hf_dir: str, dtype: str = "float32", layers_per_block: int = 1,
            progress: Callable[[str], None] | None = None) -> Converted:
  """Converts an HF causal-LM directory into a chain of blocks (params as numpy arrays)."""
  if dtype not in DTYPES:
    raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  hf_config = read_hf_config(hf_dir)
  config = models.config_from_hf(hf_config)
  config = dataclasses.replace(config, eos_token_ids=_eos_ids(hf_dir, config.eos_token_ids))
  groups = config.layer_groups(layers_per_block)
  reader = TensorReader(hf_dir)
  target = DTYPES[dtype]

  trees: list[dict[str, Any]] = [{} for _ in range(len(groups) + 2)]
  used: set[str] = set()
  rules = rules_for(config)
  for n, rule in enumerate(rules):
    if progress:
      progress(f"mapping {rule.hf_name} ({n + 1}/{len(rules)})")
    for name, index, layer_attr, _ in _placements(config, rule, layers_per_block):
      per_tensor = []  # per expert (one entry unless the rule is per-expert): param values
      for tensor_name in _expert_names(name, config):
        tensor = reader.read(tensor_name)
        if not np.issubdtype(tensor.dtype, np.floating) and tensor.dtype != ml_dtypes.bfloat16:
          raise ConversionError(f"tensor {tensor_name!r} has non-float dtype {tensor.dtype}")
        if not np.all(np.isfinite(tensor.astype(np.float32))):
          raise ConversionError(f"tensor {tensor_name!r} holds NaN or Inf values (corrupt checkpoint?)")
        per_tensor.append(rule.transform.forward(tensor))
        used.add(tensor_name)
      for k, path in enumerate(rule.paths):
        parts = [values[k] for values in per_tensor]
        value = np.stack(parts) if rule.per_expert else parts[0]
        _set(trees[index], path.replace("{L}", layer_attr), np.ascontiguousarray(value.astype(target)))

  unused = sorted(n for n in reader.names() - used
                  if not n.endswith(IGNORED_SUFFIXES) and not _tied_duplicate(n, config))
  if unused:
    raise ConversionError(f"unexpected tensors in the checkpoint (not in the {config.family} "
                          f"mapping table): {', '.join(unused[:8])}")

  embed = Block(EMBED, config.embed_config(), trees[0])
  blocks = [embed]
  blocks += [Block(LAYERS, config.layers_config(first, count), trees[1 + g])
             for g, (first, count) in enumerate(groups)]
  blocks.append(Block(HEAD, config.head_config(embed.id if config.tie_word_embeddings else None),
                      trees[-1]))
  for b in blocks:
    _check_shapes(b, config, rules)
  return Converted(config, hf_config, blocks)


def _eos_ids(hf_dir: str, from_config: tuple[int, ...]) -> tuple[int, ...]:
  """config.json's EOS ids, then generation_config.json's (Gemma, Llama 3 and Qwen list several
  there: generation stops on any of them)."""
  ids = list(from_config)
  path = os.path.join(hf_dir, "generation_config.json")
  if os.path.isfile(path):
    try:
      with open(path) as f:
        value = json.load(f).get("eos_token_id")
    except (OSError, ValueError) as e:
      raise ConversionError(f"{path}: unreadable: {e}") from e
    for i in (value if isinstance(value, list) else [] if value is None else [value]):
      if int(i) not in ids:
        ids.append(int(i))
  return tuple(ids)


def _tied_duplicate(name: str, config: ModelConfig) -> bool:
  # Some tied checkpoints still save lm_head.weight (a copy of the embedding table).
  return config.tie_word_embeddings and name == "lm_head.weight"


def _check_shapes(block: Block, config: ModelConfig, rules: list[Rule]) -> None:
  expected = dict(flat_leaves(abstract_params(block.kind, block.config,
                                              config.max_position_embeddings)))
  got = dict(flat_leaves(block.params))
  for path, spec in expected.items():
    if path not in got:
      raise ConversionError(f"{block.kind} block: no checkpoint tensor provides param {path!r}")
    if tuple(got[path].shape) != tuple(spec.shape):
      source = _hf_source(path, rules)
      raise ConversionError(
          f"tensor {source!r} gives {block.kind} param {path!r} shape {tuple(got[path].shape)}, "
          f"expected {tuple(spec.shape)} from config.json")


def _hf_source(path: str, rules: list[Rule]) -> str:
  tail = path.split("/", 1)[1] if path.startswith("layer_") else path
  for rule in rules:
    if any(p.replace("{L}/", "") == tail for p in rule.paths):
      return rule.hf_name
  return path


def export(config: ModelConfig, hf_config: dict[str, Any], blocks: list[Block], out_dir: str) -> None:
  """Writes blocks back as an HF checkpoint (config.json + model.safetensors, float32)."""
  tensors: dict[str, np.ndarray] = {}
  layers_per_block = blocks[1].config["num_layers"] if len(blocks) > 2 else 1
  for rule in rules_for(config):
    for name, index, layer_attr, _ in _placements(config, rule, layers_per_block):
      values = [np.asarray(_get(blocks[index].params, p.replace("{L}", layer_attr)), np.float32)
                for p in rule.paths]
      if not rule.per_expert:
        tensors[name] = np.ascontiguousarray(rule.transform.inverse(values))
        continue
      for j, expert_name in enumerate(_expert_names(name, config)):
        tensors[expert_name] = np.ascontiguousarray(rule.transform.inverse([v[j] for v in values]))
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
