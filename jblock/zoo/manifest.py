"""Model manifests: a model is a name, its config and a chain of block ids (models/<name>.json)."""

import datetime
import json
import os
import re
from typing import Any

from jblock.blocks import Block
from jblock.errors import InvalidRequestError, JBlockError
from jblock.models.config import ModelConfig

MANIFEST_FORMAT = "jblock-manifest-v1"

# Files a tokenizer or generation defaults may need; copied when the HF dir has them.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
    "generation_config.json",
)
# Written by jblock.train.variants next to a fine-tune; used as lineage when none is passed.
LINEAGE_FILE = "lineage.json"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ModelExistsError(JBlockError):
  """A model name is taken by a different chain (convert with overwrite=True to replace it)."""

  grpc_code = "ALREADY_EXISTS"


class CorruptedManifestError(JBlockError):
  """A manifest file is unreadable or lacks what loading the model needs."""

  grpc_code = "DATA_LOSS"


def check_name(name: str) -> str:
  """Model names become file names: letters, digits, '.', '_', '-'; no path separators."""
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise InvalidRequestError(
        "name", f"{name!r} is not a valid model name (1-128 of A-Z a-z 0-9 . _ -, "
        "starting with a letter or digit)")
  return name


def tokenizer_files(hf_dir: str) -> list[str]:
  return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, f))]


def source_lineage(hf_dir: str) -> dict[str, Any] | None:
  path = os.path.join(hf_dir, LINEAGE_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      lineage = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None  # lineage is informational: a broken file must not stop a conversion
  return lineage if isinstance(lineage, dict) else None


def build(name: str, config: ModelConfig, hf_config: dict[str, Any], blocks: list[Block],
          chain: list[str], hf_dir: str, dtype: str, layers_per_block: int,
          lineage: dict[str, Any] | None, tokenizer: str | None) -> dict[str, Any]:
  """The manifest dict; `tokenizer` is the tokenizer directory relative to the zoo root."""
  return {
      "format": MANIFEST_FORMAT,
      "name": name,
      "family": config.family,
      "architecture": config.architecture,
      "config": config.to_dict(),
      "chain": chain,
      # Per-chain-entry param bytes, so logical sizes need no block reads.
      "block_bytes": [b.nbytes for b in blocks],
      "hf_config": hf_config,
      "tokenizer": tokenizer,
      "lineage": {
          "base_model": None,
          **(lineage or {}),
          "source_dir": os.path.abspath(hf_dir),
          "conversion": {"dtype": dtype, "layers_per_block": layers_per_block},
      },
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def validate(manifest: Any) -> None:
  """Raises ValueError when a manifest lacks what loading a model needs."""
  if not isinstance(manifest, dict):
    raise ValueError("not a JSON object")
  missing = [k for k in ("name", "config", "chain", "block_bytes") if k not in manifest]
  if missing:
    raise ValueError(f"missing {', '.join(missing)}")
  chain = manifest["chain"]
  if not isinstance(chain, list) or len(chain) < 3 or not all(isinstance(i, str) for i in chain):
    raise ValueError("chain must list at least 3 block ids (embed, layers..., head)")
  if len(manifest["block_bytes"]) != len(chain):
    raise ValueError("block_bytes and chain differ in length")
