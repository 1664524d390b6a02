"""PEFT LoRA adapter directory -> delta blocks over a base model's chain (no torch, no peft).

A PEFT adapter is `adapter_config.json` + `adapter_model.safetensors` whose tensors are named
`base_model.model.<HF module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. Each base
layers block the adapter touches gets one *delta block* (kind "lora"): its config names the base
block id and, per projection, the rank and the scaling (alpha / r, or alpha / sqrt(r) with
rsLoRA); its params are the factors in jblock's orientation, `a` [in, r] and `b` [r, out], at
`layer_{k}/attn/q/{a,b}` etc. A fused HF projection (GPT-2 `c_attn`, Phi-3 `qkv_proj`) keeps one
A and splits B along its outputs like the base kernel is split. `modules_to_save` tensors (a
retrained `lm_head` or `embed_tokens`) become full blocks of their kind.
"""

import dataclasses
import json
import os
import re
from typing import Any, Callable

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import safe_open

from jblock.blocks import EMBED, HEAD, LAYERS, Block
from jblock.convert.hf import DTYPES
from jblock.convert.mappings import rules_for
from jblock.errors import ConversionError, UnsupportedModelError
from jblock.models.config import ModelConfig
from jblock.models.lora import TARGETS

LORA = "lora"  # the delta block kind
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_REJECTED_SWITCHES = ("use_dora", "lora_bias", "layer_replication", "use_qalora")


@dataclasses.dataclass
class BaseBlock:
  """What the conversion needs of one base chain block: id, kind, block.json record."""
  block_id: str
  kind: str
  record: dict[str, Any]  # config and leaves {path: {dtype, shape}}


@dataclasses.dataclass
class AdapterConverted:
  peft_config: dict[str, Any]
  chain: list[Block | None]  # per base chain position: a replacing full block, or None (base)
  deltas: list[Block | None]  # per base chain position: the delta block, or None
  targets: list[str]  # HF module names the adapter adapts


def read_peft_config(peft_dir: str) -> dict[str, Any]:
  path = os.path.join(peft_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ConversionError(f"{peft_dir}: no {CONFIG_FILE} (not a PEFT adapter directory)")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: invalid JSON: {e}") from e
  if not isinstance(cfg, dict):
    raise ConversionError(f"{path}: not a JSON object")
  kind = str(cfg.get("peft_type", "")).upper()
  if kind != "LORA":
    raise UnsupportedModelError(f"PEFT type {cfg.get('peft_type')!r} is not supported "
                                "(only LORA adapters are)")
  for switch in _REJECTED_SWITCHES:
    if cfg.get(switch):
      what = "DoRA (use_dora=true)" if switch == "use_dora" else f"{switch}={cfg[switch]!r}"
      raise UnsupportedModelError(f"{path}: {what} is not supported")
  if cfg.get("bias", "none") != "none":
    raise UnsupportedModelError(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
  r = cfg.get("r")
  if not isinstance(r, int) or r < 1:
    raise ConversionError(f"{path}: r must be a positive integer, got {r!r}")
  return cfg


def _read_tensors(peft_dir: str) -> dict[str, np.ndarray]:
  path = os.path.join(peft_dir, WEIGHTS_FILE)
  if not os.path.isfile(path):
    raise ConversionError(f"{peft_dir}: no {WEIGHTS_FILE}")
  try:
    with safe_open(path, framework="numpy") as f:
      return {name: f.get_tensor(name) for name in f.keys()}
  except (SafetensorError, OSError, ValueError) as e:
    raise ConversionError(f"{path}: unreadable safetensors file: {e}") from e


def module_table(config: ModelConfig) -> dict[str, tuple[int, list[str]]]:
  """HF module name (layer index filled in) -> (layer, jblock projection paths it feeds)."""
  out = {}
  for rule in rules_for(config):
    if rule.kind != LAYERS or rule.per_expert or not rule.hf_name.endswith(".weight"):
      continue
    targets = [p[len("{L}/"):-len("/kernel")] for p in rule.paths
               if p.startswith("{L}/") and p.endswith("/kernel")]
    if len(targets) != len(rule.paths) or not all(t in TARGETS for t in targets):
      continue
    for layer in range(config.num_layers):
      if rule.applies_to_layer(config, layer):
        out[rule.hf_name[:-len(".weight")].replace("{i}", str(layer))] = (layer, targets)
  return out


def _pattern_value(patterns: dict[str, Any], module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the module's name."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _targeted(cfg: dict[str, Any], table: dict[str, tuple[int, list[str]]]) -> list[str]:
  """Modules of the base the adapter config targets (PEFT's matching rules)."""
  targets = cfg.get("target_modules")
  layers = cfg.get("layers_to_transform")
  if isinstance(layers, int):
    layers = [layers]
  if targets is None:
    raise ConversionError(f"{CONFIG_FILE}: target_modules is missing")
  if targets == "all-linear":
    found = list(table)
  elif isinstance(targets, str):
    found = [m for m in table if re.fullmatch(targets, m)]
    if not found:
      raise ConversionError(f"target_modules {targets!r} matches no projection of the base")
  else:
    found = []
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in table})
    for t in targets:
      hits = [m for m in table if m == t or m.endswith(f".{t}")]
      if not hits:
        raise ConversionError(f"unknown target module {t!r}: the base's projections are "
                              f"{', '.join(suffixes)}")
      found += [m for m in hits if m not in found]
  if layers is not None:
    found = [m for m in found if table[m][0] in set(layers)]
  return found


def _layer_positions(base: list[BaseBlock]) -> dict[int, tuple[int, int]]:
  """Global layer -> (chain position of its layers block, layer index inside the block)."""
  out, layer = {}, 0
  for pos, b in enumerate(base):
    if b.kind == LAYERS:
      for k in range(b.record["config"]["num_layers"]):
        out[layer] = (pos, k)
        layer += 1
  return out


def convert_adapter(peft_dir: str, config: ModelConfig, base: list[BaseBlock],
                    load_block: Callable[[str], Block], dtype: str = "float32") -> AdapterConverted:
  """Reads a PEFT LoRA adapter and builds its delta blocks over the base chain `base`.

  Checks that the adapter fits the base: every targeted module has both factors, ranks agree
  with r / rank_pattern, shapes agree with the base kernels; any other tensor is an error that
  names it.
  """
  if dtype not in DTYPES:
    raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  cfg = read_peft_config(peft_dir)
  tensors = _read_tensors(peft_dir)
  table = module_table(config)
  targeted = _targeted(cfg, table)
  positions = _layer_positions(base)
  if len(positions) != config.num_layers:
    raise ConversionError(f"the base chain has {len(positions)} layers, its config "
                          f"{config.num_layers}")
  target_dtype = DTYPES[dtype]
  used: set[str] = set()
  deltas: dict[int, tuple[dict, dict, dict, list]] = {}  # pos -> (params, ranks, scaling, targets)
  for module in targeted:
    layer, paths = table[module]
    names = [f"{PREFIX}{module}.lora_{x}.weight" for x in "AB"]
    for n in names:
      if n not in tensors:
        raise ConversionError(f"missing tensor {n!r} (target module {module} is in "
                              "target_modules)")
    a, b = (np.asarray(tensors[n], np.float32) for n in names)
    used.update(names)
    rank = int(_pattern_value(cfg.get("rank_pattern"), module, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
      raise ConversionError(f"tensors of {module}: lora_A {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)} do not have rank {rank} (r / rank_pattern)")
    pos, k = positions[layer]
    leaves = base[pos].record["leaves"]
    kernels = [leaves.get(f"layer_{k}/{p}/kernel") for p in paths]
    if any(s is None for s in kernels):
      raise ConversionError(f"target module {module}: the base block {base[pos].block_id[:12]} "
                            "has no such projection")
    d_in = kernels[0]["shape"][0]
    outs = [s["shape"][1] for s in kernels]
    if a.shape[1] != d_in or b.shape[0] != sum(outs):
      raise ConversionError(
          f"tensors of {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
          f"the base projection [{d_in} -> {sum(outs)}] (wrong base model?)")
    scale = alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)
    params, ranks, scaling, mods = deltas.setdefault(pos, ({}, {}, {}, []))
    mods.append(module)
    for path, b_part in zip(paths, np.split(b, np.cumsum(outs)[:-1], axis=0)):
      node = params.setdefault(f"layer_{k}", {})
      for p in path.split("/"):
        node = node.setdefault(p, {})
      node["a"] = np.ascontiguousarray(a.T.astype(target_dtype))
      node["b"] = np.ascontiguousarray(b_part.T.astype(target_dtype))
      ranks[f"layer_{k}/{path}"] = rank
      scaling[f"layer_{k}/{path}"] = scale

  replaced = _modules_to_save(cfg, tensors, used, config, base, load_block, target_dtype)
  extra = sorted(set(tensors) - used)
  if extra:
    hint = (" (LoRA on embeddings is not supported)"
            if any("lora_embedding" in n for n in extra) else "")
    raise ConversionError(f"unexpected tensors in the adapter (not of a targeted module of the "
                          f"{config.family} base){hint}: {', '.join(extra[:8])}")
  if not deltas and not any(b is not None for b in replaced):
    raise ConversionError(f"{peft_dir}: the adapter changes nothing")
  out_deltas: list[Block | None] = [None] * len(base)
  for pos, (params, ranks, scaling, mods) in deltas.items():
    out_deltas[pos] = Block(LORA, {
        "base": base[pos].block_id, "ranks": ranks, "scaling": scaling,
        "targets": sorted(ranks), "modules": sorted(mods)}, params)
  return AdapterConverted(cfg, replaced, out_deltas, targeted)


def _modules_to_save(cfg, tensors, used, config: ModelConfig, base: list[BaseBlock],
                     load_block, target_dtype) -> list[Block | None]:
  """Full embed/head blocks for `modules_to_save` tensors (e.g. lm_head.weight)."""
  chain: list[Block | None] = [None] * len(base)
  saved = {n[len(PREFIX):]: n for n in tensors if n.startswith(PREFIX) and n not in used
           and ".lora_" not in n}
  if not saved:
    return chain
  rules = {r.hf_name: r for r in rules_for(config) if not r.per_layer}
  for name in saved:
    if name not in rules:
      raise ConversionError(f"modules_to_save tensor {saved[name]!r} is not supported (only "
                            f"{', '.join(sorted(rules))})")
  head_pos, embed_pos = len(base) - 1, 0
  tied = base[head_pos].record["config"].get("tied_to") is not None
  for name, full in saved.items():
    rule = rules[name]
    pos = embed_pos if rule.kind == EMBED else head_pos
    if rule.kind == HEAD and tied and rule.hf_name == "lm_head.weight":
      raise UnsupportedModelError("modules_to_save lm_head on a base with tied embeddings is not "
                                  "supported")
    block = chain[pos] or _copy(load_block(base[pos].block_id))
    values = rule.transform.forward(np.asarray(tensors[full], np.float32))
    for path, value in zip(rule.paths, values):
      node = block.params
      *parents, leaf = path.split("/")
      for p in parents:
        node = node[p]
      expected = base[pos].record["leaves"][path]["shape"]
      if list(value.shape) != list(expected):
        raise ConversionError(f"modules_to_save tensor {full!r} has shape {tuple(value.shape)}, "
                              f"the base's {tuple(expected)}")
      node[leaf] = np.ascontiguousarray(value.astype(target_dtype))
    chain[pos] = block
    used.add(full)
  if chain[embed_pos] is not None and tied:  # the head's math names its embedding table
    head = chain[head_pos] or _copy(load_block(base[head_pos].block_id))
    chain[head_pos] = Block(HEAD, {**head.config, "tied_to": chain[embed_pos].id}, head.params)
  return chain


def _copy(block: Block) -> Block:
  def copy(tree):
    return {k: copy(v) if isinstance(v, dict) else np.array(v) for k, v in tree.items()}
  return Block(block.kind, json.loads(json.dumps(block.config)), copy(block.params))
