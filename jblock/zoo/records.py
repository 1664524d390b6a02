"""Equivalence records on disk: "block a ≈ block b for model m", with the measured loss.

Layout under the zoo root:
  equivalence/<model>/<key>.json   one measurement (see jblock.zoo.equivalence for the fields)

A record names the model (and the digest of the chain it was measured on), the chain position,
the model's own block there, the candidate block, the substitutions already applied when it
was measured (its context) and the calibration set's hash; its key hashes exactly these, so
the same measurement is stored once. Records are written by atomic rename like everything in
the zoo. gc removes a record with any block it names, and when its model is gone or was
re-converted to a different chain (the measurement no longer describes that model).
"""

import hashlib
import json
import os
import re
from typing import Any, Iterable, Sequence

from jblock.zoo import atomic

RECORDS_DIR = "equivalence"
FORMAT = "jblock-equivalence-v1"
_KEY = re.compile(r"[0-9a-f]{40}")


def chain_digest(chain: Sequence[str], deltas: Sequence[str | None] | None = None) -> str:
  """A short hash of a chain of block ids (and a LoRA adapter's delta ids over it): records are
  valid for exactly this chain."""
  text = "\n".join(chain)
  if deltas and any(deltas):
    text += "\ndeltas\n" + "\n".join(d or "-" for d in deltas)
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def record_key(model_chain: str, position: int, candidate: str, calibration: str,
               context: Iterable[tuple[int, str]]) -> str:
  text = json.dumps([model_chain, int(position), candidate, calibration,
                     sorted([int(p), str(b)] for p, b in context)], separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:40]


def _model_dir(root: str, model: str) -> str:
  return os.path.join(root, RECORDS_DIR, model)


def path(root: str, model: str, key: str) -> str:
  return os.path.join(_model_dir(root, model), f"{key}.json")


def read(root: str, model: str, key: str) -> dict[str, Any] | None:
  try:
    with open(path(root, model, key)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None  # absent, or damaged: it is measured again and rewritten
  return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def write(root: str, tmp_dir: str, record: dict[str, Any]) -> str:
  """Publishes a record atomically (replacing an older one with the same key); returns its path."""
  final = path(root, record["model"], record["key"])
  os.makedirs(os.path.dirname(final), exist_ok=True)
  with atomic.temp_dir(tmp_dir) as tmp:
    staged = os.path.join(tmp, "record.json")
    atomic.write_json(staged, record)
    atomic.publish_file(staged, final, overwrite=True)
  return final


def read_all(root: str, model: str | None = None) -> list[dict[str, Any]]:
  """Every readable record (of one model, or of all), sorted by model, position, date."""
  base = os.path.join(root, RECORDS_DIR)
  models = [model] if model else (sorted(os.listdir(base)) if os.path.isdir(base) else [])
  out = []
  for m in models:
    directory = _model_dir(root, m)
    if not os.path.isdir(directory):
      continue
    for entry in sorted(os.listdir(directory)):
      if entry.endswith(".json") and _KEY.fullmatch(entry[:-len(".json")]):
        record = read(root, m, entry[:-len(".json")])
        if record is not None:
          out.append(record)
  out.sort(key=lambda r: (r["model"], r["position"], r.get("created", "")))
  return out


def block_ids(record: dict[str, Any]) -> set[str]:
  """Every block a record depends on."""
  return {record["block"], record["candidate"], *(b for _, b in record.get("context", [])),
          *([record["delta"]] if record.get("delta") else [])}


def prune(root: str, tmp_dir: str, stored: set[str], chains: dict[str, Sequence[str]],
          deltas: dict[str, Sequence[str | None] | None] | None = None) -> int:
  """Removes records naming a block not in `stored`, or whose model (name -> chain) is gone or
  has another chain (or, for an adapter, other `deltas`) now, and anything in equivalence/ that
  is not a record; returns how many records went. The caller holds the zoo lock exclusively (gc)."""
  base = os.path.join(root, RECORDS_DIR)
  if not os.path.isdir(base):
    return 0
  removed = 0
  for model in sorted(os.listdir(base)):
    directory = os.path.join(base, model)
    if not os.path.isdir(directory):
      os.remove(directory)
      continue
    chain = chains.get(model)
    digest = chain_digest(chain, (deltas or {}).get(model)) if chain is not None else None
    for entry in sorted(os.listdir(directory)):
      record = None
      if entry.endswith(".json") and _KEY.fullmatch(entry[:-len(".json")]):
        record = read(root, model, entry[:-len(".json")])
      keep = (record is not None and digest is not None and record["model_chain"] == digest
              and block_ids(record) <= stored)
      if not keep:
        target = os.path.join(directory, entry)
        if os.path.isdir(target):
          atomic.remove_dir(target, tmp_dir)
        else:
          os.remove(target)
        removed += 1
    if not os.listdir(directory):
      os.rmdir(directory)
  return removed
