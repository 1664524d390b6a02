"""Typed step contracts between the scheduler, the executors and the block instances.

A `BlockBatch` is what the scheduler decides and an executor runs: a segment of one or more
consecutive block instances, the step items (rows) that go through it, and their `StepMeta`.
`StepMeta` is host-side (numpy) and packs into two arrays, so one step's metadata reaches the
device in two transfers whatever the number of blocks, rows or sampling fields.
"""

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Packed int32 columns of StepMeta before the page tables.
_INT_FIELDS = ("starts", "n_valid", "top_k", "seed_lo", "seed_hi", "step", "adapter", "rope_len")
_FLOAT_FIELDS = ("temperature", "top_p")
SEED_MODULUS = 1 << 64  # seeds are uint64 (as the proto allows), folded into two 32-bit words


@dataclasses.dataclass
class StepMeta:
  """Per-row metadata of one padded batch (all arrays have the padded batch as first dim)."""
  page_tables: np.ndarray  # int32 [n_layers_instances, B, W]: each row's KV pages per instance
  starts: np.ndarray  # int32 [B]: tokens already cached = position of the row's first token
  n_valid: np.ndarray  # int32 [B]: real tokens in the row (0 = padding row)
  temperature: np.ndarray  # float32 [B]: 0 = greedy
  top_k: np.ndarray  # int32 [B]: 0 = off
  top_p: np.ndarray  # float32 [B]: 1 = off
  seed_lo: np.ndarray  # int32 [B]: low 32 bits of the seed (bit pattern)
  seed_hi: np.ndarray  # int32 [B]: high 32 bits of the seed (bit pattern)
  step: np.ndarray  # int32 [B]: tokens the row's request generated so far
  adapter: np.ndarray  # int32 [B]: per-row adapter slot (-1 = none)
  # int32 [B]: sequence length dynamic / longrope RoPE take (a prefill chunk: its prompt's
  # length); a smaller value (0) means starts + n_valid (jblock.models.rope.rope_length)
  rope_len: np.ndarray = None
  # int32 [C]: LoRA bank columns the batch's adapters use (slot * max rank + j, -1 = padding);
  # None = every column. Not packed: local segments take it beside the banks.
  lora_cols: np.ndarray | None = None
  # The optional per-row head inputs (jblock.runtime.head_rows: logprobs, penalties, bias,
  # grammar masks...); None when no row of the batch uses any. Not packed, like lora_cols.
  head: dict[str, np.ndarray] | None = None

  @classmethod
  def empty(cls, batch: int, n_tables: int, width: int) -> "StepMeta":
    zi = lambda: np.zeros(batch, np.int32)
    return cls(page_tables=np.zeros((n_tables, batch, width), np.int32), starts=zi(),
               n_valid=zi(), temperature=np.zeros(batch, np.float32), top_k=zi(),
               top_p=np.ones(batch, np.float32), seed_lo=zi(), seed_hi=zi(), step=zi(),
               adapter=np.full(batch, -1, np.int32), rope_len=zi())

  def set_seed(self, row: int, seed: int) -> None:
    seed %= SEED_MODULUS
    self.seed_lo[row] = np.uint32(seed & 0xFFFFFFFF).view(np.int32)
    self.seed_hi[row] = np.uint32(seed >> 32).view(np.int32)

  def pack(self) -> tuple[np.ndarray, np.ndarray]:
    """(ints [B, 7 + n_tables * W] int32, floats [B, 2] float32)."""
    n_tables, b, w = self.page_tables.shape
    ints = np.empty((b, len(_INT_FIELDS) + n_tables * w), np.int32)
    for i, name in enumerate(_INT_FIELDS):
      ints[:, i] = getattr(self, name)
    ints[:, len(_INT_FIELDS):] = self.page_tables.transpose(1, 0, 2).reshape(b, n_tables * w)
    floats = np.stack([getattr(self, name) for name in _FLOAT_FIELDS], axis=1).astype(np.float32)
    return ints, floats


def unpack(ints, floats, n_tables: int) -> dict[str, Any]:
  """Inverse of StepMeta.pack, inside a jitted function (works on jax and numpy arrays)."""
  b = ints.shape[0]
  out = {name: ints[:, i] for i, name in enumerate(_INT_FIELDS)}
  out.update({name: floats[:, i] for i, name in enumerate(_FLOAT_FIELDS)})
  k = len(_INT_FIELDS)
  width = (ints.shape[1] - k) // max(n_tables, 1)
  out["page_tables"] = (ints[:, k:].reshape(b, n_tables, width).transpose(1, 0, 2)
                        if n_tables else None)
  return out


@dataclasses.dataclass(eq=False)
class StepItem:
  """One request's next piece of work in a chain: a prefill chunk or a decode step."""
  req: Any  # the engine's request record
  pos: int  # chain position of the segment it waits for
  start: int  # tokens cached before this item
  n: int  # real tokens it carries
  t_pad: int  # padded length (1 for decode)
  final: bool  # last chunk of the prompt, or a decode step: samples a token at the head
  x: Any  # token list (at the embed) or (hidden array, row)
  enqueued: float = 0.0
  epoch: int = 0  # the request's epoch when queued (a paused request's older items are stale)


@dataclasses.dataclass(eq=False)
class BlockBatch:
  """The scheduler's decision: run `items` through `segment` (instances, in chain order)."""
  seq: int  # batch number, for the trace
  segment: Any  # runtime.segments.Segment
  items: list[StepItem]
  b_pad: int  # padded batch size (a compiled bucket)
  t_pad: int  # padded tokens per row
  meta: StepMeta


@runtime_checkable
class BlockInstance(Protocol):
  """A block resident somewhere (this process's mesh, or a worker), with its KV page pool.
  Implementations: jblock.runtime.instance.LocalBlockInstance, jblock.cluster.remote.
  RemoteBlockInstance, and the mock engine's; InstanceBase gives the defaults."""
  key: str  # unique per engine: block id, or model/block id without sharing
  block_id: str  # content hash of the block
  kind: str  # embed | layers | head
  config: dict  # the block's compute config
  batch_size: int  # most rows per batch through this instance
  models: set  # names of the models whose chains use it
  pool: Any  # runtime.kv.PagePool for layers instances, None otherwise
  placement: str  # where it lives, in words
  resident_bytes: int  # params bytes on its devices
  local: bool  # on this process's mesh (fusable; `params` and `kv` here)
  remote: bool  # hosted by a worker (re-placeable: `recover`)
  executor_key: str  # the executor that runs it when not local
  address: str  # its worker's address (remote)
  available: bool  # False while it is being re-placed
  lost_reason: str  # why it could not be re-placed ("" = placed)
  params: Any  # params on this process's devices (local), else None
  embed_table: Any  # an embed's table (a tied head shares it), else None
  lora_bank: Any  # LoRA bank targets, once an adapter needs them
  batches_run: int
  items_run: int

  def stats(self) -> dict: ...
  def close(self) -> None: ...
  def recover(self, reason: str, to: str | None = None) -> None: ...
