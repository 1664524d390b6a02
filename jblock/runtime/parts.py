"""Expert-level sharing in device memory: each zoo part is loaded once per engine.

A MoE layers block is stored as content-addressed parts (jblock.zoo.experts): one per expert and
one with the layer's other leaves. An engine loads such a block part by part through one
`DevicePartPool`; a part that another of its blocks already loaded is reused as the very same
jax.Arrays, so two fine-tunes that share 6 of 8 experts of a layer hold those 6 once. The experts
stay one array per expert: the block's params hold `experts/{gate,up,down}` as tuples of E
arrays, which jblock.models.moe reads with one switch per tile (cost follows routed tokens).
"""

import threading
from typing import Any, Iterable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jblock.blocks import Block
from jblock.runtime import mesh as mesh_lib
from jblock.zoo import experts


class DevicePartPool:
  """Parts of a zoo on one mesh, keyed by part id; thread-safe."""

  def __init__(self, zoo, mesh: Mesh):
    self.zoo = zoo
    self.mesh = mesh
    self._lock = threading.Lock()
    self._parts: dict[str, dict[str, Any]] = {}

  def load_block(self, block_id: str) -> Block | None:
    """The block with its parts on devices (experts as tuples), or None if it has no parts."""
    record = self.zoo.block_record(block_id)
    layout = record.get("parts")
    if not layout:
      return None
    shapes: dict[str, Any] = {}
    for path, leaf in record["leaves"].items():
      experts._set(shapes, path, jax.ShapeDtypeStruct(tuple(leaf["shape"]), leaf["dtype"]))
    # The stacked block's shardings; an expert's slice drops the leading expert axis.
    stacked = mesh_lib.param_shardings(shapes, self.mesh)
    groups = [g for g in layout if g != experts.REST]
    params = self._part(layout[experts.REST], experts._without(stacked, groups))
    params = _copy_dicts(params)  # the tree is this block's; its arrays are shared
    for group in groups:
      per_expert = {name: NamedSharding(self.mesh, PartitionSpec(*s.spec[1:]))
                    for name, s in experts._get(stacked, group).items()}
      loaded = [self._part(pid, per_expert) for pid in layout[group]]
      for name in per_expert:
        experts._set(params, f"{group}/{name}", tuple(p[name] for p in loaded))
    return Block(record["kind"], record["config"], params)

  def _part(self, pid: str, shardings: dict[str, Any]) -> dict[str, Any]:
    with self._lock:
      part = self._parts.get(pid)
      if part is None:
        host = self.zoo.read_part(pid)  # checked against its id
        part = jax.tree.map(jax.device_put, host, shardings)
        self._parts[pid] = part
      return part


def _copy_dicts(tree: dict[str, Any]) -> dict[str, Any]:
  return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}


def resident_bytes(instances: Iterable[Any]) -> int:
  """Param bytes on this engine's devices, each device array counted once however many
  blocks hold it; instances hosted elsewhere count what they report."""
  seen: set[int] = set()
  total = 0
  for inst in instances:
    params = inst.params
    if params is None:
      total += inst.resident_bytes
      continue
    for a in jax.tree.leaves(params):
      if id(a) not in seen:
        seen.add(id(a))
        total += int(a.nbytes)
  return total
