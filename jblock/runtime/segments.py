"""Segments: runs of consecutive block instances that always execute as one call.

Two consecutive instances of a chain fuse when every model that passes through the first goes
on to the second and the same models pass through both (e.g. the shared bottom of partial
fine-tunes, or the whole chain of a model served alone), both are local and they have the same
batch size. A fused segment is one jitted function over all its blocks' params and KV pools: one
dispatch per step instead of one per block, hidden states never leave the call. Blocks keep
their identity (ids, sharing, stats, KV pools); only the dispatch is shared.
"""

import dataclasses
import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jblock.blocks import EMBED, HEAD, LAYERS
from jblock.models import blocks as block_fns
from jblock.runtime import mesh as mesh_lib
from jblock.runtime.logits import head_outputs, prompt_outputs
from jblock.runtime.step import unpack


@dataclasses.dataclass(eq=False)
class Segment:
  instances: list  # consecutive instances of a chain, in order
  start: int  # chain position of the first instance (in the chains that use it)

  @property
  def key(self) -> tuple[str, ...]:
    return tuple(i.key for i in self.instances)

  @property
  def batch_size(self) -> int:
    return min(i.batch_size for i in self.instances)

  @property
  def starts_at_embed(self) -> bool:
    return self.instances[0].kind == EMBED

  @property
  def ends_at_head(self) -> bool:
    return self.instances[-1].kind == HEAD

  @property
  def layers(self) -> list:
    return [i for i in self.instances if i.kind == LAYERS]

  @property
  def local(self) -> bool:
    return self.instances[0].local

  @property
  def models(self) -> set[str]:
    return set().union(*(i.models for i in self.instances))

  def __repr__(self):
    return f"Segment({'+'.join(i.kind for i in self.instances)} @{self.start})"


def plan_segments(chains: dict[str, Sequence[Any]], fuse: bool = True,
                  through_shared: bool = False) -> dict[str, list[Segment]]:
  """Cuts every model's chain of instances into segments (fused where the rule above allows).

  Instances shared by several models get one Segment object, so their queues are shared and
  requests of different models batch together there. `through_shared`: fuse each model's
  consecutive local instances whoever else uses them — a model whose chain alternates its own
  and shared blocks (an assembled model) runs as one call per step; the shared instances keep
  one copy of their weights and KV pool, but their rows batch per model, not across models.
  """
  def follows(a, b) -> bool:
    same_models = a.models == b.models or through_shared
    if not (fuse and same_models and a.local and b.local
            and a.batch_size == b.batch_size):
      return False
    if through_shared:
      return True
    for chain in chains.values():
      for p, inst in enumerate(chain):
        if inst is a and (p + 1 >= len(chain) or chain[p + 1] is not b):
          return False
    return True

  segments: dict[tuple[str, ...], Segment] = {}
  out: dict[str, list[Segment]] = {}
  for name, chain in chains.items():
    cut, current, start = [], [chain[0]], 0
    for p in range(1, len(chain)):
      if follows(chain[p - 1], chain[p]):
        current.append(chain[p])
      else:
        cut.append((start, current))
        current, start = [chain[p]], p
    cut.append((start, current))
    out[name] = [segments.setdefault(tuple(i.key for i in insts), Segment(insts, s))
                 for s, insts in cut]
  return out


# Bounded: every compiled executable holds executable memory mappings (the kernel allows 65530 per
# process); a process that builds many engines must let old segment functions go.
@functools.lru_cache(maxsize=32)
def segment_fn(structure: tuple[tuple[str, str], ...], kv_shardings: tuple, mesh):
  """The jitted step of a segment with this structure ((kind, config JSON) per block).

  fn(params list, KV pools list (donated), x, ints, floats, banks, lora_cols, head) -> (y, KV
  pools): y is the hidden state [B, T, D], or at the head the sampled tokens [B] int32 (a dict
  with the logprobs too when `head`, the optional head inputs of jblock.runtime.head_rows, asks).
  `ints` and `floats` are a packed StepMeta; `banks` (optional) has one adapter bank or None per
  block (jblock.runtime.lora: LoRA on layers blocks, compressed deltas on any), applied per row by StepMeta.adapter over the bank
  columns `lora_cols` (StepMeta.lora_cols; one compiled shape per column bucket). One compiled
  function serves every segment of this structure (all variants of a model and every fine-tune
  that shares its shapes).
  """
  applies = [block_fns.apply_fn(kind, json.loads(cfg)) for kind, cfg in structure]
  n_tables = sum(kind == LAYERS for kind, _ in structure)
  rep = mesh_lib.replicated(mesh)

  def step(params, kvs, x, ints, floats, banks=None, lora_cols=None, head=None):
    m = unpack(ints, floats, n_tables)
    base = {"starts": m["starts"], "n_valid": m["n_valid"], "rope_len": m["rope_len"]}
    new_kvs, li = [], 0
    for bi, ((kind, _), apply, p) in enumerate(zip(structure, applies, params)):
      meta = dict(base)
      if banks is not None and banks[bi] is not None:
        meta.update(lora=banks[bi], adapter=m["adapter"], lora_cols=lora_cols)
      if kind == LAYERS:
        meta["page_table"] = m["page_tables"][li]
        x, kv = apply(p, kvs[li], x, meta)
        new_kvs.append(kv)
        li += 1
      elif kind == EMBED:
        x, _ = apply(p, {}, x, meta)
      else:  # head: each row's last real token (every token for prompt logprobs), sampled here
        last = jnp.maximum(m["n_valid"] - 1, 0)
        rows = jnp.arange(x.shape[0])
        if head is not None and "targets" in head:
          all_logits = apply(p, {}, x, meta)[0]
          prompt = prompt_outputs(all_logits, head["targets"])
          x = {**head_outputs(all_logits[rows, last], m, head), **prompt}
        else:
          logits = apply(p, {}, x[rows, last][:, None], meta)[0][:, 0]
          x = head_outputs(logits, m, head)
    return x, new_kvs

  kv_out = [{"k": s, "v": s} for s in kv_shardings]
  return jax.jit(step, donate_argnums=(1,), out_shardings=(rep, kv_out))


def local_segment_fn(segment: Segment):
  insts = segment.instances
  structure = tuple((i.kind, i.config_json) for i in insts)
  return segment_fn(structure, tuple(i.kv_sharding for i in segment.layers), insts[0].mesh)
