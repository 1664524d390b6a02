"""Converting a Hugging Face checkpoint into a zoo: the blocks it lacks, then the manifest.

`convert` takes the Zoo (jblock.zoo.store) to write into and its expert-part store (to count
only the bytes a block adds); Zoo.convert calls it. PEFT adapters go through
jblock.zoo.adapters instead.
"""

from typing import Any, Callable

from jblock.blocks import Block
from jblock.convert import hf
from jblock.zoo import experts
from jblock.zoo import manifest as manifests
from jblock.zoo.manifest import ModelExistsError
from jblock.zoo.reports import ConvertReport


def new_bytes(block: Block, parts: experts.PartStore) -> int:
  """Param bytes storing this block adds: all of them, or its parts not yet stored."""
  layout, block_parts = experts.split(block.params)
  if not layout:
    return block.nbytes
  return sum(experts.part_nbytes(p) for pid, p in block_parts.items() if not parts.has(pid))


def convert(zoo, parts: experts.PartStore, hf_dir: str, name: str, dtype: str = "float32",
            layers_per_block: int = 1, overwrite: bool = False,
            lineage: dict[str, Any] | None = None,
            progress: Callable[[str], None] | None = None) -> ConvertReport:
  """Converts an HF checkpoint into `zoo`: stores the blocks it lacks, then the manifest.

  lineage: recorded in the manifest (e.g. {"base_model": "llama-base"}); default: the HF
  dir's lineage.json when present. Converting the same model again writes nothing. A name
  held by a different chain raises ModelExistsError unless overwrite.
  """
  manifests.check_name(name)
  say = progress or (lambda _: None)
  converted = hf.convert(hf_dir, dtype=dtype, layers_per_block=layers_per_block,
                         progress=progress)
  chain = [b.id for b in converted.blocks]
  previous = zoo.chain_of(name)
  if previous is not None and previous != chain and not overwrite:
    raise ModelExistsError(f"model {name!r} already exists with a different chain; "
                           "pass overwrite=True (--overwrite) to replace it")

  written, reused = [], []
  written_bytes: dict[str, int] = {}
  with zoo.writing():
    for i, (block, block_id) in enumerate(zip(converted.blocks, chain)):
      if block_id in written or block_id in reused:
        continue
      if not zoo.has_block(block_id):
        written_bytes[block_id] = new_bytes(block, parts)
        say(f"block {i + 1}/{len(chain)} {block.kind} {block_id[:12]}: writing "
            f"{written_bytes[block_id]} bytes")
        if zoo.write_block(block, block_id):
          written.append(block_id)
          continue
      say(f"block {i + 1}/{len(chain)} {block.kind} {block_id[:12]}: already stored")
      reused.append(block_id)
    manifest_written = False
    if overwrite or previous is None:
      data = manifests.build(
          name, converted.config, converted.hf_config, converted.blocks, chain, hf_dir, dtype,
          layers_per_block, lineage if lineage is not None else manifests.source_lineage(hf_dir),
          tokenizer=None)
      manifest_written = zoo.publish_model(name, data, hf_dir, overwrite)
      say(f"manifest models/{name}.json " + ("written" if manifest_written else "already there"))

  return ConvertReport(name=name, chain=chain, written=written, reused=reused,
                       bytes_written=sum(written_bytes[i] for i in written),
                       model_bytes=sum(b.nbytes for b in converted.blocks),
                       manifest_written=manifest_written)


__all__ = ["convert", "new_bytes"]
