"""Compressed full-fine-tune deltas (qdelta blocks) in the adapter banks of their base instances
(layers blocks, and untied embed and head blocks).

A qdelta block (jblock.convert.full_delta) shares the engine-wide slots of jblock.runtime.lora
with LoRA adapters: the fine-tune resident in slot s has its packed kernel deltas and whole
small-leaf deltas at index s of its base instances' bank entries (layout: jblock.models.deltas),
with "on" = 1 there; every other slot of those arrays is zeros with "on" = 0. A bank grows an
encoding's arrays for a projection the first time a fine-tune needs them (one recompile), and
they are replicated over the instance's mesh (a delta is a few bits per weight).
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jblock.blocks import flat_leaves
from jblock.errors import JBlockError
from jblock.models.deltas import kernel_leaf


def check_shapes(inst, factors: dict[str, dict[str, Any]], model: str) -> None:
  """Every leaf delta matches the base instance's leaf; every kernel delta its kernel's width."""
  leaves = {path: np.shape(value) for path, value in flat_leaves(inst.params)}
  for entry, parts in factors.items():
    for key, part in parts.items():
      if "value" in part:
        want = leaves.get(f"{entry}/{key}")
        if want != np.shape(part["value"]):
          raise JBlockError(f"model {model!r}: delta {entry}/{key} has shape "
                            f"{list(np.shape(part['value']))}, the base block {inst.block_id[:12]} "
                            f"{list(want) if want else 'has no such leaf'}")
      elif kernel_leaf(entry) not in leaves:
        raise JBlockError(f"model {model!r}: base block {inst.block_id[:12]} has no projection "
                          f"{entry}")


def ensure_delta_bank(inst, factors: dict[str, dict[str, Any]], slots: int) -> None:
  """A local instance's bank has room (zeros) for these factors' arrays in every slot."""
  bank = dict(inst.lora_bank or {})
  rep = NamedSharding(inst.mesh, P())
  grew = False
  for entry, parts in factors.items():
    have = dict(bank.get(entry) or {})
    for key, part in parts.items():
      if key in have:
        continue
      have[key] = {k: jax.device_put(np.zeros((slots,) + np.shape(v), np.asarray(v).dtype), rep)
                   for k, v in part.items()}
      grew = True
    bank[entry] = have
  if grew:
    inst.lora_bank = bank
    inst.lora_bank_bytes = bank_bytes(bank)


def bank_bytes(bank) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(bank))


def factor_bytes(factors) -> int:
  return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(factors))
