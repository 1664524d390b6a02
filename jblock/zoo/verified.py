"""The blocks of each model's last verified manifest: verified/<name>.json.

Written when a manifest is published (conversion, adapters, full deltas, assemble), when
`verify` passes a model, and when an operator re-seals one. gc keeps every block these name
unless forced, so a manifest that is tampered with (blocks dropped) or removed by hand does
not take its blocks with it. Zoo.remove_model removes the model's record with it.
"""

import datetime
import json
import os
from typing import Any

from jblock.errors import JBlockError
from jblock.zoo import atomic
from jblock.zoo.integrity import HASH_FIELD

VERIFIED_DIR = "verified"


class UnreadableVerifiedRecordError(JBlockError):
  """A verified/<name>.json that does not read: gc cannot tell which blocks it protects."""

  grpc_code = "DATA_LOSS"


def _path(root: str, name: str) -> str:
  return os.path.join(root, VERIFIED_DIR, f"{name}.json")


def block_ids(data: dict[str, Any]) -> list[str]:
  """Every block a manifest references: its chain and its delta blocks."""
  return sorted({*data["chain"], *(d for d in data.get("deltas") or () if d)})


def write(root: str, tmp_dir: str, name: str, data: dict[str, Any]) -> None:
  """Records manifest `data` of model `name` as verified (the caller holds the zoo lock)."""
  os.makedirs(os.path.join(root, VERIFIED_DIR), exist_ok=True)
  record = {"model": name, HASH_FIELD: data.get(HASH_FIELD), "blocks": block_ids(data),
            "verified": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  with atomic.temp_dir(tmp_dir) as tmp:
    staged = os.path.join(tmp, "verified.json")
    atomic.write_json(staged, record)
    atomic.publish_file(staged, _path(root, name), overwrite=True)


def remove(root: str, name: str) -> bool:
  try:
    os.remove(_path(root, name))
    return True
  except FileNotFoundError:
    return False


def names(root: str) -> list[str]:
  directory = os.path.join(root, VERIFIED_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(e[:-len(".json")] for e in os.listdir(directory) if e.endswith(".json"))


def read_all(root: str) -> dict[str, set[str]]:
  """{model: the block ids of its last verified manifest}; an unreadable record raises."""
  out = {}
  for name in names(root):
    try:
      with open(_path(root, name)) as f:
        record = json.load(f)
      blocks = record["blocks"]
      if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
        raise ValueError("'blocks' is not a list of block ids")
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UnreadableVerifiedRecordError(
          f"{VERIFIED_DIR}/{name}.json is unreadable ({type(e).__name__}: {e})") from e
    out[name] = set(blocks)
  return out


__all__ = ["VERIFIED_DIR", "UnreadableVerifiedRecordError", "block_ids", "names", "read_all",
           "remove", "write"]
