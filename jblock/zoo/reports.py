"""What the zoo's operations report: a conversion, the zoo's accounting, a gc."""

import dataclasses


@dataclasses.dataclass
class ConvertReport:
  name: str
  chain: list[str]  # block ids, embed first, head last
  written: list[str]  # ids newly stored by this conversion
  reused: list[str]  # ids already in the zoo (or stored concurrently by another writer)
  bytes_written: int  # param bytes of `written`
  model_bytes: int  # param bytes of the whole chain
  manifest_written: bool  # False when the same model was already there


@dataclasses.dataclass
class ZooStats:
  models: int
  stored_blocks: int
  referenced_blocks: int  # distinct ids in some chain
  orphan_blocks: int  # stored, referenced by no manifest (gc removes them)
  missing_blocks: int  # referenced, not stored (verify reports them)
  logical_bytes: int  # sum over models of their chain's param bytes: storage without sharing
  stored_bytes: int  # sum over distinct stored blocks of their param bytes
  disk_bytes: int  # what blocks/ and parts/ take on disk (orbax compresses)
  stored_parts: int = 0  # expert-level parts stored (each expert once; jblock.zoo.experts)
  part_blocks: int = 0  # stored blocks kept as parts
  part_block_bytes: int = 0  # param bytes of those blocks, each counted whole
  part_bytes: int = 0  # param bytes of the distinct parts they list (what is stored for them)

  @property
  def dedup_ratio(self) -> float:
    return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0


@dataclasses.dataclass
class GcReport:
  removed: list[str]  # block ids
  freed_bytes: int  # on-disk bytes of the removed blocks
  stale_tmp: int  # leftovers of crashed writes removed from tmp/
  records_removed: int = 0  # equivalence records naming a removed block or a gone model
  # Blocks kept only because a model's last verified manifest referenced them (jblock.zoo.verified;
  # gc(force=True) removes them), and those models.
  kept: list[str] = dataclasses.field(default_factory=list)
  kept_for: list[str] = dataclasses.field(default_factory=list)
