"""The engine's configuration: batch sizes, KV pools, buckets, caching and rerouting knobs."""

import dataclasses
from typing import Any, Callable

from jblock.blocks import Block
from jblock.runtime.kv import pages_for
from jblock.runtime.reroute import RerouteConfig
from jblock.runtime.scheduler import SchedulerConfig


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  batch_size: int = 8  # default max step items per block batch
  batch_size_by_kind: tuple[tuple[str, int], ...] = ()  # per-kind override, e.g. (("head", 16),)
  batch_size_by_block: tuple[tuple[str, int], ...] = ()  # per-block-id override (id or id prefix)
  kv_slots: int = 16  # concurrent requests per layers instance (KV leases)
  kv_slots_by_block: tuple[tuple[str, int], ...] = ()  # per-block-id override (id or id prefix)
  kv_pages: int = 0  # KV pages per layers instance; 0 = kv_slots full-length requests' worth
  page_size: int = 16  # tokens per KV page
  max_seq_len: int = 256  # longest request: prompt + generated tokens
  prefill_chunk: int = 64  # longest prompt piece one step item carries
  length_buckets: tuple[int, ...] = (16, 64)  # padded prefill lengths (decode is length 1)
  max_waiting: int = 256  # admission queue bound; beyond it submit raises OverloadedError
  max_waiting_per_model: int = 0  # per-model admission bound (0 = max_waiting)
  fuse_segments: bool = True  # run consecutive blocks always traversed together as one call
  fuse_through_shared: bool = False  # fuse each model's local chain even through shared blocks (batches per model)
  max_in_flight_per_segment: int = 1  # batches of one segment on the device at once
  warmup: bool = True  # compile every decode bucket (and the prefill buckets) at start-up
  compilation_cache_dir: str | None = None  # persistent XLA compilation cache
  trace_size: int = 2000  # batches kept for the trace view
  lora_slots: int = 4  # LoRA adapters resident at once (bank slots per base layers block)
  lora_max_rank: int = 16  # bank factors are padded to this rank; larger adapters are refused
  reroute: RerouteConfig = RerouteConfig()  # steps onto equivalent blocks under load
  enable_prefix_caching: bool = True  # reuse computed prefixes' KV, across models that share blocks

  def kv_slots_for(self, block_id: str) -> int:
    for prefix, slots in self.kv_slots_by_block:
      if block_id.startswith(prefix):
        return slots
    return self.kv_slots

  def kv_pages_for(self, block_id: str) -> int:
    return self.kv_pages or self.kv_slots_for(block_id) * self.max_pages

  @property
  def max_pages(self) -> int:
    return pages_for(self.max_seq_len, self.page_size)

  def batch_size_for(self, block_id: str, kind: str) -> int:
    for prefix, size in self.batch_size_by_block:
      if block_id.startswith(prefix):
        return size
    return dict(self.batch_size_by_kind).get(kind, self.batch_size)

  def scheduler_config(self) -> SchedulerConfig:
    return SchedulerConfig(
        prefill_chunk=self.prefill_chunk, prefill_buckets=tuple(self.prefill_buckets()),
        max_waiting=self.max_waiting, max_waiting_per_model=self.max_waiting_per_model,
        max_in_flight_per_segment=self.max_in_flight_per_segment, page_size=self.page_size,
        max_pages=self.max_pages, prefix_caching=self.enable_prefix_caching)

  def batch_buckets(self, batch_size: int) -> list[int]:
    return self.scheduler_config().batch_buckets(batch_size)

  def prefill_buckets(self) -> list[int]:
    return sorted({min(b, self.prefill_chunk) for b in self.length_buckets} | {self.prefill_chunk})


# (key, block, block_id, batch_size, tied embedding table or None) -> a block instance.
InstanceFactory = Callable[[str, Block, str, int, Any], Any]
