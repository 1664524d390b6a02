"""What an engine reads from the zoo to serve a model: its spec (config, chain, deltas) from the
manifest, and each block restored straight onto its devices."""

import dataclasses
from typing import Any, Callable

import jax

from jblock.blocks import Block
from jblock.models.config import ModelConfig


@dataclasses.dataclass
class ModelSpec:
  """A model the engine can serve: its config, block chain and tokenizer location."""
  name: str
  config: ModelConfig
  chain: list[Block]  # params may be empty: loaded from the zoo onto devices, or hosted elsewhere
  tokenizer_dir: str | None = None
  block_ids: list[str] | None = None  # the chain's ids (from a manifest); hashed from params if None
  # A LoRA adapter: per chain position, its delta block (kind "lora") or None; params may be
  # empty (read from the zoo into host memory when the model is added).
  deltas: list[Block | None] | None = None
  delta_ids: list[str | None] | None = None
  base_model: str | None = None  # an adapter's base model

  def __post_init__(self):
    if self.block_ids is None:
      self.block_ids = [b.id for b in self.chain]
    if self.deltas is not None and self.delta_ids is None:
      self.delta_ids = [d.id if d is not None else None for d in self.deltas]


def load_on_devices(zoo, block_id: str, shardings_for: Callable[[Any], Any]) -> Block:
  """Restores a block from the zoo straight onto the shardings `shardings_for` gives its tree of
  leaf shapes (jax.ShapeDtypeStruct); no host copy is kept."""
  record = zoo.block_record(block_id)
  shapes: dict[str, Any] = {}
  for path, leaf in record["leaves"].items():
    node = shapes
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = jax.ShapeDtypeStruct(tuple(leaf["shape"]), jax.numpy.dtype(leaf["dtype"]))
  if not shapes:
    return zoo.load_block(block_id)
  return zoo.load_block(block_id, sharding=shardings_for(shapes))


def spec_from_zoo(zoo, name: str, cache: dict[str, Block], load_params: bool = True) -> ModelSpec:
  """A model's spec from its manifest; each block read (and hash-checked) once via `cache`.

  Without params (blocks hosted by workers) only each block's kind and config are read. A
  manifest that fails the zoo's integrity checks raises ManifestIntegrityError naming the model.
  """
  manifest = zoo.checked_manifest(name)
  deltas = None
  if manifest.get("deltas"):  # a LoRA adapter: delta blocks over its base's chain
    deltas = [Block(zoo.block_record(d)["kind"], zoo.block_record(d)["config"], {}) if d else None
              for d in manifest["deltas"]]
  chain = []
  for block_id in manifest["chain"]:
    if block_id not in cache:
      if load_params:
        cache[block_id] = zoo.load_block(block_id)
      else:
        record = zoo.block_record(block_id)
        cache[block_id] = Block(record["kind"], record["config"], {})
    chain.append(cache[block_id])
  return ModelSpec(name, ModelConfig.from_dict(manifest["config"]), chain, zoo.tokenizer_dir(name),
                   block_ids=list(manifest["chain"]), deltas=deltas,
                   delta_ids=list(manifest["deltas"]) if deltas else None,
                   base_model=(manifest.get("adapter") or {}).get("base_model"))
