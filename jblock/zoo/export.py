"""A zoo model back out as a Hugging Face checkpoint, so any tool can check what jblock serves.

A full fine-tune stored as compressed delta blocks is materialised: each qdelta position becomes
the base block plus its decoded delta (jblock.convert.full_delta.materialize), the dense weights
the server computes with. The checkpoint is float32 safetensors with the model's config.json and
tokenizer files. LoRA adapter models are refused: their PEFT directory is the portable form.
"""

import os
import shutil
from typing import Callable

from jblock.convert import full_delta, hf
from jblock.errors import ConversionError
from jblock.models.config import ModelConfig
from jblock.zoo import atomic


def export_model(zoo, name: str, out_dir: str,
                 progress: Callable[[str], None] | None = None) -> list[str]:
  """Writes model `name` to `out_dir` (created; refused when it exists and is not empty).
  Returns the files written."""
  say = progress or (lambda _: None)
  manifest = zoo.checked_manifest(name)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ConversionError(f"--out={out_dir}: exists and is not empty")
  deltas = manifest.get("deltas") or [None] * len(manifest["chain"])
  blocks = []
  for p, (block_id, delta_id) in enumerate(zip(manifest["chain"], deltas)):
    block = zoo.load_block(block_id)
    if delta_id:
      delta = zoo.load_block(delta_id)
      if delta.kind != full_delta.QDELTA:
        raise ConversionError(f"model {name!r}: position {p} holds a {delta.kind} delta block; "
                              "export its PEFT adapter directory instead")
      say(f"block {p}: materialising {delta.config['method']} delta {delta_id[:12]}")
      block = full_delta.materialize(block, delta)
    blocks.append(block)
  config = ModelConfig.from_dict(manifest["config"])
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  # Written beside the target and renamed, so a failed export leaves no half checkpoint.
  with atomic.temp_dir(parent) as staging:
    hf.export(config, manifest["hf_config"], blocks, staging)
    # Every tokenizer file the zoo kept (tokenizer_dir() wants a tokenizer.json; this does not).
    tokenizer = zoo.tokenizer_path(manifest)
    for entry in sorted(os.listdir(tokenizer)) if tokenizer and os.path.isdir(tokenizer) else ():
      src = os.path.join(tokenizer, entry)
      if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(staging, entry))
    files = sorted(os.listdir(staging))
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)
    os.rename(staging, out_dir)
  say(f"wrote {len(files)} files to {out_dir}")
  return files
