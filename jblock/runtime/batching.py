"""A batch's step metadata, built from its rows' requests: padded sizes (compiled buckets), page
tables per layers instance (read-only prefix pages encoded), per-row sampling and adapters."""

from jblock.runtime import head_rows
from jblock.runtime.kv import pages_for
from jblock.runtime.lora import has_lora
from jblock.runtime.step import StepItem, StepMeta


def batch_meta(cfg, seg, items: list[StepItem], t_pad: int, adapters) -> tuple[int, StepMeta]:
  """(padded batch size, StepMeta) of `items` through segment `seg` (scheduler config `cfg`)."""
  b_pad = next(b for b in cfg.batch_buckets(seg.batch_size) if b >= len(items))
  need = max(pages_for(it.start + it.t_pad, cfg.page_size) for it in items)
  width = next((w for w in cfg.width_buckets() if w >= need), cfg.max_pages)
  meta = StepMeta.empty(b_pad, len(seg.layers), width)
  for row, it in enumerate(items):
    req = it.req
    meta.starts[row] = it.start
    meta.n_valid[row] = it.n
    meta.rope_len[row] = rope_len(req, it)
    meta.adapter[row] = req.adapter_slot
    for j, lease in enumerate(req.tables[it.pos]):
      pages = lease.pool.table(lease, width)
      meta.page_tables[j, row, :len(pages)] = pages
    if seg.ends_at_head:
      p = req.params
      meta.temperature[row] = p.temperature
      meta.top_k[row] = p.top_k
      meta.top_p[row] = p.top_p
      meta.set_seed(row, p.seed)
      meta.step[row] = len(req.generated)
  if seg.ends_at_head:
    meta.head = head_rows.build(items, b_pad, t_pad, seg.instances[-1].config.get("vocab_size", 0))
  # Bank columns serve one-token rows only: a prompt chunk multiplies each row by its own
  # slot's factors (jblock.models.lora.delta), so it compiles without a column list.
  if adapters is not None and t_pad == 1 and seg.layers and any(has_lora(i.lora_bank) for i in seg.layers):
    meta.lora_cols = adapters.columns(meta.adapter[:len(items)])
  return b_pad, meta


def rope_len(req, item: StepItem) -> int:
  """The sequence length RoPE scalings take for an item (jblock.models.rope): a prompt chunk
  takes its prompt's, a replay chunk the length its pending step reaches, a decode step its own."""
  if req.replay_to and item.start < req.replay_to:
    return req.replay_to + 1
  if item.start < len(req.prompt):
    return len(req.prompt)
  return item.start + item.n
