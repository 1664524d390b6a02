"""Accounting and integrity of a zoo: its stats, verify (re-hash every block, check every
manifest: jblock.zoo.integrity) and gc (remove what no manifest references, and leftovers of
crashed writes; blocks of a model's last verified manifest stay unless forced).

Each takes the Zoo (jblock.zoo.store) it looks after, plus the collaborators of it that it
needs (its expert-part store, its lock); the Zoo's own stats/verify/gc call these.
"""

import os
import shutil
from typing import Any, Callable

from jblock.errors import JBlockError, NotFoundError
from jblock.zoo import atomic, blockio, experts, integrity, records, verified
from jblock.zoo.manifest import CorruptedManifestError
from jblock.zoo.reports import GcReport, ZooStats


def _readable_manifests(zoo) -> dict[str, dict[str, Any]]:
  out = {}
  for name in zoo.models():
    try:
      out[name] = zoo.manifest(name)
    except (CorruptedManifestError, NotFoundError):
      continue  # unreadable (verify reports it) or removed meanwhile
  return out


def stats(zoo, parts: experts.PartStore) -> ZooStats:
  models = _readable_manifests(zoo)
  stored = set(zoo.block_ids())
  referenced = {i for m in models.values() for i in m["chain"] + (m.get("deltas") or []) if i}
  stored_bytes, part_ids, part_blocks, part_block_bytes = 0, set(), 0, 0
  for block_id in stored:
    try:
      record = zoo.block_record(block_id)
    except JBlockError:
      continue  # unreadable record: verify reports it
    if record.get("parts"):
      part_ids.update(experts.part_ids(record["parts"]))
      part_blocks += 1
      part_block_bytes += int(record["nbytes"])
    else:
      stored_bytes += int(record["nbytes"])
  part_ids &= set(parts.ids())
  part_bytes = sum(parts.nbytes(pid) for pid in part_ids)
  stored_bytes += part_bytes
  return ZooStats(
      models=len(models), stored_blocks=len(stored), referenced_blocks=len(referenced),
      orphan_blocks=len(stored - referenced), missing_blocks=len(referenced - stored),
      logical_bytes=sum(sum(m["block_bytes"]) + sum(m.get("delta_bytes") or [])
                        for m in models.values()),
      stored_bytes=stored_bytes,
      disk_bytes=dir_size(zoo.blocks_dir) + dir_size(parts.dir),
      stored_parts=len(part_ids), part_blocks=part_blocks, part_block_bytes=part_block_bytes,
      part_bytes=part_bytes)


def verify(zoo, progress: Callable[[str], None] | None = None) -> list[str]:
  """Re-hashes every stored block and checks every manifest; returns the problems found.

  Each model that passes (manifest and every block it references) is recorded as verified
  (jblock.zoo.verified), so gc keeps its blocks even if its manifest is later tampered with."""
  say = progress or (lambda _: None)
  problems, bad_blocks = [], set()
  entries = sorted(os.listdir(zoo.blocks_dir)) if os.path.isdir(zoo.blocks_dir) else []
  for n, entry in enumerate(entries):
    if not blockio.BLOCK_ID.fullmatch(entry):
      problems.append(f"blocks/{entry}: not a block id (stray entry)")
    elif not zoo.has_block(entry):
      problems.append(f"block {entry}: no {blockio.RECORD_FILE} (incomplete block)")
    else:
      say(f"checking block {n + 1}/{len(entries)} {entry[:12]}")
      try:
        zoo.load_block(entry)
      except JBlockError as e:
        problems.append(str(e))
        bad_blocks.add(entry)
  passed = {}
  for name in zoo.models():
    try:
      data = zoo.manifest(name)
    except JBlockError as e:
      problems.append(str(e))
      continue
    found = integrity.problems(zoo, name, data, skip=bad_blocks)
    problems += [f"{integrity.where(name)}: {p}" for p in found]
    if not found and not bad_blocks & set(verified.block_ids(data)):
      passed[name] = data
  problems += _record_verified(zoo, passed)
  return problems


def _record_verified(zoo, passed: dict[str, dict[str, Any]]) -> list[str]:
  try:
    with zoo.writing():
      for name, data in passed.items():
        verified.write(zoo.root, zoo.tmp_dir, name, data)
  except OSError as e:  # a read-only zoo still verifies; it only cannot remember the result
    return [f"could not record verified models in {verified.VERIFIED_DIR}/: {e.strerror}"]
  return []


def gc(zoo, lock: atomic.ZooLock, parts: experts.PartStore, force: bool = False) -> GcReport:
  """Removes blocks no manifest references, and leftovers of crashed writes in tmp/.

  Holds the zoo lock exclusively, so it waits for running conversions to finish. Refuses
  to run while some manifest is unreadable: it cannot know what that model references.
  Keeps the blocks of each model's last verified manifest (a manifest tampered with or removed
  by hand must not take them with it) unless `force`, which also drops the verified records
  of models whose manifest is gone.
  """
  if not os.path.isdir(zoo.root):
    return GcReport([], 0, 0)
  with lock.exclusive():
    referenced, chains, deltas = set(), {}, {}
    for name in zoo.models():
      try:
        data = zoo.manifest(name)
        chains[name] = data["chain"]
        deltas[name] = data.get("deltas")
        referenced.update(chains[name])
        referenced.update(d for d in data.get("deltas") or () if d)  # LoRA delta blocks
      except CorruptedManifestError as e:
        raise JBlockError(f"gc refused: {e}") from e
      except NotFoundError:
        continue
    kept = _kept_for_verified(zoo, referenced) if not force else {}
    if force:
      for name in set(verified.names(zoo.root)) - set(zoo.models()):
        verified.remove(zoo.root, name)
    removed, freed = [], 0
    for block_id in zoo.block_ids():
      if block_id not in referenced and block_id not in kept:
        directory = os.path.join(zoo.blocks_dir, block_id)  # block_ids() lists only ids
        freed += dir_size(directory)
        atomic.remove_dir(directory, zoo.tmp_dir)
        removed.append(block_id)
    pruned = records.prune(zoo.root, zoo.tmp_dir, set(zoo.block_ids()), chains, deltas)
    freed += _gc_parts(zoo, parts)
    stale = 0
    for entry in os.listdir(zoo.tmp_dir) if os.path.isdir(zoo.tmp_dir) else []:
      path = os.path.join(zoo.tmp_dir, entry)
      if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
      stale += 1
  stored = set(zoo.block_ids())
  kept_for = sorted({m for b, models in kept.items() if b in stored for m in models})
  return GcReport(removed, freed, stale, pruned, kept=sorted(set(kept) & stored),
                  kept_for=kept_for)


def _kept_for_verified(zoo, referenced: set[str]) -> dict[str, set[str]]:
  """{block id: models} for the blocks that only last verified manifests reference."""
  kept: dict[str, set[str]] = {}
  try:
    records_ = verified.read_all(zoo.root)
  except verified.UnreadableVerifiedRecordError as e:
    raise JBlockError(f"gc refused: {e}; pass --force to ignore verified records") from e
  for name, blocks in records_.items():
    for block_id in blocks - referenced:
      kept.setdefault(block_id, set()).add(name)
  return kept


def _gc_parts(zoo, parts: experts.PartStore) -> int:
  """Removes expert-level parts no stored block lists; returns the bytes freed."""
  kept = set()
  for block_id in zoo.block_ids():
    try:
      layout = zoo.block_record(block_id).get("parts")
    except JBlockError:
      return 0  # cannot tell what an unreadable block lists: keep every part
    kept.update(experts.part_ids(layout) if layout else ())
  return sum(parts.remove(pid) for pid in parts.ids() if pid not in kept)


def dir_size(path: str) -> int:
  total = 0
  for parent, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(parent, f))
      except OSError:
        continue
  return total


__all__ = ["dir_size", "gc", "stats", "verify"]
