"""Expert-level storage: a block with mixture-of-experts layers is stored as content-addressed parts.

A layers block's `.../experts/{gate,up,down}` leaves are stacked on a leading expert axis. The
zoo cuts such a block into parts: one per (experts group, expert j) holding that expert's
slices, and one `rest` part with every other leaf (attention, norms, router). Each part is
stored once under `parts/<part id>/` (an orbax checkpoint plus part.json), so a fine-tune that
retrained 2 of 4 experts of a layer writes 2 expert parts and nothing else. The block's
block.json lists its parts (`"parts": {"rest": id, "<group path>": [id per expert]}`); the
block id stays the hash of the whole params, and loading reassembles and re-hashes it.
"""

import json
import os
from typing import Any, Callable

import numpy as np

from jblock.blocks import block_id, flat_leaves
from jblock.zoo import atomic, blockio

PARTS_DIR = "parts"
PART_FILE = "part.json"
REST = "rest"
_PART_KIND = "part"


def expert_groups(params: dict[str, Any]) -> list[str]:
  """'/'-paths of the `experts` subtrees (every leaf under one is stacked on axis 0)."""
  groups = set()
  for path, _ in flat_leaves(params):
    parts = path.split("/")
    if len(parts) >= 2 and parts[-2] == "experts":
      groups.add("/".join(parts[:-1]))
  return sorted(groups)


def _get(tree: dict, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _without(tree: dict, groups: list[str], prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    if path in groups:
      continue
    out[key] = _without(value, groups, path) if isinstance(value, dict) else value
  return out


def part_id(params: dict[str, Any]) -> str:
  return block_id(_PART_KIND, {}, params)


def split(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """(layout, parts by id): layout = {"rest": id, group: [id per expert]}; {} if no experts."""
  groups = expert_groups(params)
  if not groups:
    return {}, {}
  host = {path: np.asarray(leaf) for path, leaf in flat_leaves(params)}
  rest = _without(params, groups)
  parts = {part_id(rest): rest}
  layout: dict[str, Any] = {REST: part_id(rest)}
  for group in groups:
    leaves = {name: host[f"{group}/{name}"] for name in _get(params, group)}
    count = next(iter(leaves.values())).shape[0]
    ids = []
    for j in range(count):
      part = {name: np.ascontiguousarray(arr[j]) for name, arr in leaves.items()}
      pid = part_id(part)
      parts[pid] = part
      ids.append(pid)
    layout[group] = ids
  return layout, parts


def part_nbytes(part: dict[str, Any]) -> int:
  return sum(int(np.asarray(a).nbytes) for _, a in flat_leaves(part))


class PartStore:
  """parts/<id>/ under a zoo root: write once, read many, gc what no block lists."""

  def __init__(self, root: str, tmp_dir: str):
    self.dir = os.path.join(root, PARTS_DIR)
    self.tmp_dir = tmp_dir

  def path(self, pid: str) -> str:
    return os.path.join(self.dir, pid)

  def has(self, pid: str) -> bool:
    return os.path.isfile(os.path.join(self.path(pid), PART_FILE))

  def ids(self) -> list[str]:
    return sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []

  def nbytes(self, pid: str) -> int:
    with open(os.path.join(self.path(pid), PART_FILE)) as f:
      return int(json.load(f)["nbytes"])

  def write(self, pid: str, part: dict[str, Any]) -> bool:
    """Stores a part; False if it was already there (or another writer stored it first)."""
    if self.has(pid):
      return False
    os.makedirs(self.dir, exist_ok=True)
    with atomic.temp_dir(self.tmp_dir) as tmp:
      staged = os.path.join(tmp, "part")
      blockio.save(staged, part)
      leaves = {p: {"dtype": str(np.asarray(a).dtype), "shape": list(np.shape(a))}
                for p, a in flat_leaves(part)}
      atomic.write_json(os.path.join(staged, PART_FILE),
                        {"id": pid, "nbytes": part_nbytes(part), "leaves": leaves})
      return atomic.publish_dir(staged, self.path(pid))

  def read(self, pid: str) -> dict[str, Any]:
    with open(os.path.join(self.path(pid), PART_FILE)) as f:
      leaves = json.load(f)["leaves"]
    return blockio.restore(self.path(pid), blockio.restore_args(leaves))

  def remove(self, pid: str) -> int:
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(self.path(pid)) for f in fs)
    atomic.remove_dir(self.path(pid), self.tmp_dir)
    return size


def assemble(layout: dict[str, Any], read: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
  """The block's params (numpy) from its parts: experts stacked back on axis 0."""
  params = read(layout[REST])
  for group, ids in layout.items():
    if group == REST:
      continue
    experts = [read(pid) for pid in ids]
    for name in experts[0]:
      _set(params, f"{group}/{name}", np.stack([np.asarray(e[name]) for e in experts]))
  return params


def part_ids(layout: dict[str, Any]) -> list[str]:
  return [layout[REST]] + [pid for g, ids in layout.items() if g != REST for pid in ids]
