"""Manifests that cannot lie: each manifest carries the sha256 of its own canonical JSON, its
chain must agree with its blocks' configs, and its tokenizer path must stay inside the zoo.

Checked by `verify` and whenever a model is loaded or served (Zoo.checked_manifest); a model
that fails is refused by name, the others are unaffected. A manifest is sealed when written
(Zoo.publish_model) and re-sealed only on an operator's word (Zoo.reseal, `tools.zoo rehash`).

Block ids do not depend on a block's position (identical layers share one block, and
equivalence may substitute a block from another position), so a layers block's config does
not name its layer indices. Layer order is covered by the seal; the chain check covers what the
configs do say: kinds, the layer count per block against num_layers, every config field that
the model config fixes at that position (per-layer sliding windows, MoE pattern, shapes),
vocab and hidden sizes of the embed and head, and a tied head's reference to the chain's own
embed block. The seal is tamper evidence, not a signature: who can write the zoo can re-seal.
"""

import hashlib
import json
import os
from typing import Any, Callable, Iterable

from jblock.blocks import EMBED, HEAD, LAYERS
from jblock.errors import JBlockError, NotFoundError
from jblock.models.config import ModelConfig
from jblock.zoo.manifest import CorruptedManifestError

HASH_FIELD = "manifest_sha256"
REHASH_HINT = "if you trust it, re-seal it with: python -m tools.zoo rehash {name}"


class ManifestIntegrityError(CorruptedManifestError):
  """A readable manifest that cannot be trusted; `problems` lists why (no absolute paths)."""

  def __init__(self, name: str, problems: list[str], verb: str = "refused"):
    super().__init__(f"{where(name)} {verb}: {'; '.join(problems)}")
    self.model = name
    self.problems = problems


def where(name: str) -> str:
  """How errors name a model: its name and its manifest's path relative to the zoo."""
  return f"model {name!r} (models/{name}.json)"


# ---- the seal

def digest(data: dict[str, Any]) -> str:
  """sha256 of the canonical JSON (sorted keys, no whitespace) of every field but the seal, so
  re-indenting a manifest keeps its seal and any change of a value breaks it."""
  body = {k: v for k, v in data.items() if k != HASH_FIELD}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(text.encode()).hexdigest()


def seal(data: dict[str, Any]) -> dict[str, Any]:
  data[HASH_FIELD] = digest(data)
  return data


def seal_problem(name: str, data: dict[str, Any]) -> str | None:
  recorded = data.get(HASH_FIELD)
  if recorded is None:
    return (f"no recorded {HASH_FIELD} (written before manifests were sealed); "
            + REHASH_HINT.format(name=name))
  if recorded != digest(data):
    return f"{HASH_FIELD} mismatch: the manifest was changed after it was written"
  return None


# ---- the chain against its blocks' configs

def block_problems(data: dict[str, Any], stored: Callable[[str], bool],
                   record_of: Callable[[str], dict[str, Any]],
                   skip: Iterable[str] = ()) -> list[str]:
  """Missing blocks, then (when every block's record reads) the chain's structure.

  Blocks in `skip` (already reported as corrupted by verify) end the check quietly."""
  chain, deltas = data["chain"], data.get("deltas")
  problems = [f"chain[{i}] block {b} is missing" for i, b in enumerate(chain) if not stored(b)]
  if deltas is not None:
    if not isinstance(deltas, list) or len(deltas) != len(chain):
      return problems + ["deltas must list one entry (a block id or null) per chain position"]
    problems += [f"deltas[{i}] block {d} is missing"
                 for i, d in enumerate(deltas) if d is not None and not stored(d)]
  if problems:
    return problems
  skipped = set(skip)
  records = {}
  for block_id in {*chain, *(d for d in deltas or () if d)}:
    if block_id in skipped:
      return []
    try:
      records[block_id] = record_of(block_id)
    except JBlockError as e:
      return [str(e)]
  try:
    return chain_problems(data, records)
  except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
    return [f"config or chain is malformed ({type(e).__name__}: {e})"]


def chain_problems(data: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
  """The chain (and deltas) against the block records (kind, config, leaves) it names."""
  chain = data["chain"]
  kinds = [records[b]["kind"] for b in chain]
  if kinds[0] != EMBED or kinds[-1] != HEAD or any(k != LAYERS for k in kinds[1:-1]):
    return [f"chain kinds are {', '.join(kinds)}; expected embed, layers..., head"]
  try:
    config = ModelConfig.from_dict(data["config"])
  except (TypeError, ValueError, KeyError) as e:
    return [f"config is not a model config ({type(e).__name__}: {e})"]
  problems = []
  first = 0
  for pos, block_id in enumerate(chain[1:-1], 1):
    count = records[block_id]["config"].get("num_layers")
    if not isinstance(count, int) or count < 1 or first + count > config.num_layers:
      problems.append(f"chain[{pos}] layers block of {count} layers does not fit after layer "
                      f"{first} of the model's num_layers {config.num_layers}")
      return problems
    differ = _differ(config.layers_config(first, count), records[block_id]["config"])
    if differ:
      problems.append(f"chain[{pos}] layers block (layers {first}-{first + count - 1}) "
                      f"disagrees with the model config in {', '.join(differ)}")
    first += count
  if first != config.num_layers:
    problems.append(f"the layers blocks cover {first} layers; the model config's num_layers "
                    f"is {config.num_layers}")
  embed, head = records[chain[0]], records[chain[-1]]
  tied_to = head["config"].get("tied_to")
  for pos, record, expected in ((0, embed, config.embed_config()),
                                (len(chain) - 1, head, config.head_config(tied_to))):
    differ = _differ(expected, record["config"])
    if differ:
      problems.append(f"chain[{pos}] {record['kind']} block disagrees with the model config in "
                      f"{', '.join(differ)}")
    elif not (record["kind"] == HEAD and tied_to) and not _has_dim(record, config.vocab_size):
      problems.append(f"chain[{pos}] {record['kind']} block has no param with a dimension of "
                      f"vocab_size {config.vocab_size}")
  if tied_to is not None and tied_to != chain[0]:
    problems.append(f"head is tied to embed block {str(tied_to)[:12]}, not to the chain's own "
                    f"embed block {chain[0][:12]}")
  return problems + _delta_problems(data, records)


def _delta_problems(data: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
  # A delta (LoRA or compressed full fine-tune) is computed over one base block: the chain's.
  problems = []
  for pos, delta_id in enumerate(data.get("deltas") or ()):
    if delta_id and records[delta_id]["config"].get("base") != data["chain"][pos]:
      problems.append(f"deltas[{pos}] block {delta_id[:12]} is over block "
                      f"{str(records[delta_id]['config'].get('base'))[:12]}, not over "
                      f"chain[{pos}] {data['chain'][pos][:12]}")
  return problems


def _differ(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
  """'key (block B, config C)' for each key both configs have with other values (compared as
  JSON: tuples are lists on disk)."""
  expected = json.loads(json.dumps(expected))
  return [f"{k} (block {_short(actual[k])}, config {_short(expected[k])})"
          for k in sorted(expected.keys() & actual.keys()) if expected[k] != actual[k]]


def _short(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _has_dim(record: dict[str, Any], size: int) -> bool:
  return any(size in leaf["shape"] for leaf in record["leaves"].values())


# ---- the tokenizer path

def tokenizer_path(root: str, data: dict[str, Any]) -> str | None:
  """The absolute path of the manifest's tokenizer directory (None when it names none);
  ValueError (no absolute path in it) when the path could leave the zoo."""
  rel = data.get("tokenizer")
  if rel is None:
    return None
  if not isinstance(rel, str) or not rel:
    raise ValueError("tokenizer must be a path relative to the zoo, or null")
  if os.path.isabs(rel) or rel.startswith("~"):
    raise ValueError(f"tokenizer path {rel!r} is absolute; it must be relative to the zoo")
  if ".." in rel.replace("\\", "/").split("/"):
    raise ValueError(f"tokenizer path {rel!r} climbs out with '..'; it must stay inside the zoo")
  path = os.path.join(root, rel)
  real_root = os.path.realpath(root)
  if not os.path.realpath(path).startswith(real_root + os.sep):
    raise ValueError(f"tokenizer path {rel!r} resolves outside the zoo (a symlink?)")
  return path


def tokenizer_problem(root: str, data: dict[str, Any]) -> str | None:
  try:
    path = tokenizer_path(root, data)
  except ValueError as e:
    return str(e)
  if path is not None and not os.path.isdir(path):
    return f"tokenizer directory {data['tokenizer']} is missing"
  return None


# ---- a whole model

def problems(zoo, name: str, data: dict[str, Any], skip: Iterable[str] = (),
             sealed: bool = True) -> list[str]:
  """Everything wrong with model `name`'s manifest `data` (the seal only when `sealed`)."""
  found = [seal_problem(name, data)] if sealed else []
  if data.get("name") != name:
    found.append(f"names model {data.get('name')!r}, not {name!r}")
  found += block_problems(data, zoo.has_block, zoo.block_record, skip)
  found.append(tokenizer_problem(zoo.root, data))
  return [p for p in found if p]


def check(zoo, name: str) -> dict[str, Any]:
  """The manifest of `name` when it passes every check; else ManifestIntegrityError."""
  data = zoo.manifest(name)
  found = problems(zoo, name, data)
  if found:
    raise ManifestIntegrityError(name, found)
  return data


def partition(zoo, names: Iterable[str]) -> tuple[list[str], dict[str, str]]:
  """(servable names, {refused name: reason}); an unknown name raises NotFoundError."""
  servable, refused = [], {}
  for name in names:
    try:
      check(zoo, name)
      servable.append(name)
    except NotFoundError:
      raise
    except ManifestIntegrityError as e:
      refused[name] = f"models/{name}.json: " + "; ".join(e.problems)
    except JBlockError as e:  # unreadable manifest or block record
      refused[name] = str(e)
  return servable, refused


__all__ = ["HASH_FIELD", "ManifestIntegrityError", "block_problems", "chain_problems", "check",
           "digest", "partition", "problems", "seal", "seal_problem", "tokenizer_path",
           "tokenizer_problem", "where"]
