"""LoRA adapters in the zoo: a PEFT adapter becomes delta blocks over its base model's chain.

An adapter's manifest is its base's manifest with
  chain        the base chain, where `modules_to_save` blocks replace base blocks,
  deltas       per chain position, the id of a delta block (kind "lora") or null,
  delta_bytes  their param bytes,
  adapter      {"base_model", "peft_type", "r", "lora_alpha", "use_rslora", "modules", ...}.
Delta blocks are content-hashed like any block (the id covers the base block id, factors,
ranks, scaling and targets), so converting the same adapter twice writes nothing.
"""

import datetime
import os
from typing import Any, Callable

from jblock.blocks import Block
from jblock.convert import peft
from jblock.errors import ConversionError, NotFoundError
from jblock.models.config import ModelConfig
from jblock.zoo import atomic
from jblock.zoo import manifest as manifests
from jblock.zoo.manifest import ModelExistsError
from jblock.zoo.reports import ConvertReport


def convert_peft(zoo, peft_dir: str, base: str, name: str, overwrite: bool = False,
                 progress: Callable[[str], None] | None = None):
  """Converts a PEFT LoRA adapter directory into `zoo` (a jblock.zoo.store.Zoo) as model
  `name` over model `base`."""
  say = progress or (lambda _: None)
  manifests.check_name(name)
  base_manifest = zoo.checked_manifest(base)  # an adapter must not inherit a tampered chain
  if base_manifest.get("deltas"):
    raise ConversionError(f"--base={base} is itself an adapter; name its base model instead")
  config = ModelConfig.from_dict(base_manifest["config"])
  base_chain = [peft.BaseBlock(i, (r := zoo.block_record(i))["kind"], r)
                for i in base_manifest["chain"]]
  dtype = (base_manifest.get("lineage") or {}).get("conversion", {}).get("dtype", "float32")
  say(f"reading adapter {peft_dir} over {base}")
  converted = peft.convert_adapter(peft_dir, config, base_chain, zoo.load_block, dtype=dtype)
  chain_blocks = [c for c in converted.chain]
  chain = [c.id if c is not None else b.block_id for c, b in zip(chain_blocks, base_chain)]
  deltas = [d.id if d is not None else None for d in converted.deltas]
  try:
    previous = zoo.manifest(name)
  except NotFoundError:
    previous = None
  if previous is not None and not overwrite and (previous["chain"], previous.get("deltas")) != (
      chain, deltas):
    raise ModelExistsError(f"model {name!r} already exists with a different chain; "
                           "pass overwrite=True (--overwrite) to replace it")
  new: list[tuple[str, Block]] = [(i, b) for i, b in zip(chain, chain_blocks) if b is not None]
  new += [(i, d) for i, d in zip(deltas, converted.deltas) if d is not None]
  written, reused, bytes_written = [], [], 0
  with zoo.writing():
    for block_id, block in new:
      if block_id in written or block_id in reused:
        continue
      if not zoo.has_block(block_id) and zoo.write_block(block, block_id):
        say(f"{block.kind} block {block_id[:12]}: writing {block.nbytes} bytes")
        written.append(block_id)
        bytes_written += block.nbytes
      else:
        reused.append(block_id)
    cfg = converted.peft_config
    block_bytes = [c.nbytes if c is not None else n
                   for c, n in zip(chain_blocks, base_manifest["block_bytes"])]
    data = {
        **base_manifest,
        "name": name,
        "chain": chain,
        "block_bytes": block_bytes,
        "deltas": deltas,
        "delta_bytes": [d.nbytes if d is not None else 0 for d in converted.deltas],
        "adapter": {
            "base_model": base, "peft_type": "LORA", "r": cfg["r"],
            "lora_alpha": cfg.get("lora_alpha", 8), "use_rslora": bool(cfg.get("use_rslora")),
            "rank_pattern": cfg.get("rank_pattern") or {},
            "alpha_pattern": cfg.get("alpha_pattern") or {},
            "target_modules": cfg.get("target_modules"),
            "modules_to_save": cfg.get("modules_to_save") or [],
            "modules": converted.targets,
            "max_rank": max([cfg["r"]] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]),
        },
        "lineage": {"base_model": base, "source_dir": os.path.abspath(peft_dir),
                    "conversion": {"dtype": dtype, "kind": "peft"}},
        "tokenizer": None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    tokenizer_src = peft_dir if os.path.isfile(os.path.join(peft_dir, "tokenizer.json")) else (
        zoo.tokenizer_path(base_manifest))
    if previous is not None and not overwrite:
      manifest_written = False
    else:
      with atomic.temp_dir(zoo.tmp_dir) as empty:
        manifest_written = zoo.publish_model(name, data, tokenizer_src or empty, overwrite)
  say(f"manifest models/{name}.json " + ("written" if manifest_written else "already there"))
  return ConvertReport(name=name, chain=chain, written=written, reused=reused,
                       bytes_written=bytes_written,
                       model_bytes=sum(block_bytes) + sum(data["delta_bytes"]),
                       manifest_written=manifest_written)


def adapter_info(manifest: dict[str, Any]) -> dict[str, Any] | None:
  """The manifest's adapter record (None for a model that is no adapter)."""
  return manifest.get("adapter") if manifest.get("deltas") else None
