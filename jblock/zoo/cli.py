"""What tools/convert.py and tools/zoo.py print: one-line errors, progress, reports and tables."""

import sys
import time
from collections import Counter
from typing import Callable, NoReturn

from absl import flags, logging

from jblock.errors import JBlockError
from jblock.zoo import equiv_cli, integrity
from jblock.zoo.reports import ConvertReport, GcReport, ZooStats
from jblock.zoo.sizes import human_bytes
from jblock.zoo.store import Zoo


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
  """One line on stderr, no traceback (2: bad usage, 1: the operation failed)."""
  sys.stderr.write(f"{prog}: error: {message}\n")
  sys.exit(code)


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """An absl flags_parser printing one line naming the flag instead of absl's usage dump."""
  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(prog, str(e).splitlines()[0])
  return parse


def quiet_libraries() -> None:
  """orbax logs every save and restore at INFO; show warnings only, unless --verbosity was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def progress_printer(stream=None) -> Callable[[str], None]:
  start = time.monotonic()
  out = stream or sys.stderr

  def say(message: str) -> None:
    out.write(f"[{time.monotonic() - start:6.1f}s] {message}\n")
    out.flush()
  return say


def convert_lines(zoo: Zoo, report: ConvertReport) -> list[str]:
  written = set(report.written)
  lines = [f"model {report.name} in {zoo.root}",
           f"  chain: {len(report.chain)} blocks"]
  for i, block_id in enumerate(report.chain):
    rec = zoo.block_record(block_id)
    state = "written" if block_id in written else "reused"
    lines.append(f"    {i:3d} {rec['kind']:<6} {block_id[:16]}  "
                 f"{human_bytes(rec['nbytes']):>10}  {state}")
  share = report.bytes_written / report.model_bytes if report.model_bytes else 0.0
  lines += [
      f"  blocks written: {len(report.written)}",
      f"  blocks reused:  {len(report.reused)}",
      f"  bytes written:  {human_bytes(report.bytes_written)} of {human_bytes(report.model_bytes)} "
      f"model bytes ({share:.1%})",
      "  manifest: " + ("written" if report.manifest_written
                        else "unchanged (same chain already in the zoo)"),
  ]
  return lines


def list_lines(zoo: Zoo) -> list[str]:
  rows = [("NAME", "FAMILY", "BLOCKS", "BYTES", "BASE")]
  for name in zoo.models():
    try:
      m = zoo.manifest(name)
    except JBlockError:  # one unreadable manifest must not hide the others (verify explains)
      rows.append((name, "UNREADABLE", "-", "-", "-"))
      continue
    rows.append((name, m.get("family", "?"), str(len(m["chain"])),
                 human_bytes(sum(m["block_bytes"])),
                 str(m.get("lineage", {}).get("base_model") or "-")))
  if len(rows) == 1:
    return [f"no models in {zoo.root}"]
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def show_lines(zoo: Zoo, name: str) -> list[str]:
  m = zoo.manifest(name)
  config = m["config"]
  lineage = m.get("lineage", {})
  conversion = lineage.get("conversion", {})
  users = Counter(i for chain in _readable_chains(zoo) for i in set(chain))
  lines = [
      f"model {name} ({m.get('family')}, {m.get('architecture')}), created {m.get('created')}",
      f"  config: vocab {config['vocab_size']}, hidden {config['hidden_size']}, "
      f"layers {config['num_layers']}, heads {config['num_heads']} ({config['num_kv_heads']} kv), "
      f"tied embeddings {config['tie_word_embeddings']}",
      f"  conversion: dtype {conversion.get('dtype')}, layers_per_block "
      f"{conversion.get('layers_per_block')}, from {lineage.get('source_dir')}",
      f"  base model: {lineage.get('base_model') or '-'}",
      f"  tokenizer: {m.get('tokenizer') or 'none'}",
      f"  seal: {_seal_state(name, m)}",
      f"  chain: {len(m['chain'])} blocks, {human_bytes(sum(m['block_bytes']))}",
  ]
  for i, (block_id, nbytes) in enumerate(zip(m["chain"], m["block_bytes"])):
    kind = zoo.block_record(block_id)["kind"] if zoo.has_block(block_id) else "MISSING"
    lines.append(f"    {i:3d} {kind:<6} {block_id[:16]}  {human_bytes(nbytes):>10}  "
                 f"used by {users[block_id]} model{'s' if users[block_id] != 1 else ''}")
  lines += _delta_lines(zoo, m)
  extra = {k: v for k, v in lineage.items() if k not in ("base_model", "source_dir", "conversion")}
  if extra:
    lines.append("  lineage: " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
  return lines + equiv_cli.show_lines(zoo, name)


def _seal_state(name: str, m: dict) -> str:
  recorded = m.get(integrity.HASH_FIELD)
  if not recorded:
    return f"none recorded (python -m tools.zoo rehash {name} seals it)"
  state = "ok" if integrity.seal_problem(name, m) is None else "MISMATCH (changed after sealing)"
  return f"{integrity.HASH_FIELD} {str(recorded)[:16]}, {state}"


def _readable_chains(zoo: Zoo) -> list[list[str]]:
  chains = []
  for name in zoo.models():
    try:
      chains.append(zoo.manifest(name)["chain"])
    except JBlockError:
      continue  # verify reports it
  return chains


def _delta_lines(zoo: Zoo, m: dict) -> list[str]:
  """A delta model's delta blocks (LoRA or compressed full fine-tune) and measured losses."""
  deltas = m.get("deltas") or []
  if not any(deltas):
    return []
  adapter = m.get("adapter") or {}
  lines = [f"  deltas over {adapter.get('base_model')} ({adapter.get('peft_type')}"
           + (f", {adapter['method']}" if adapter.get("method") else "") + "):"]
  full = m.get("full_delta") or {}
  for i, block_id in enumerate(deltas):
    if block_id:
      record = zoo.block_record(block_id) if zoo.has_block(block_id) else None
      kind = record["kind"] if record else "MISSING"
      method = (record or {}).get("config", {}).get("method", "")
      lines.append(f"    {i:3d} {kind:<6} {method:<8} {block_id[:16]}  "
                   f"{human_bytes(int(record['nbytes'])) if record else '?':>10}")
  if full.get("encodings"):
    lines.append("  encodings: " + ", ".join(f"{p}={e}" for p, e in full["encodings"].items()))
  for split, loss in (full.get("losses") or {}).items():
    lines.append(f"  {split}: KL {loss['kl']:.5f}, top-1 {loss['top1']:.4f} over "
                 f"{loss['tokens']} tokens")
  if full.get("distill"):
    d = full["distill"]
    lines.append(f"  bitdelta distillation: {d['steps']} steps, KL {d['kl_start']:.5f} -> "
                 f"{d['kl_end']:.5f}")
  return lines


def stats_lines(zoo: Zoo, stats: ZooStats) -> list[str]:
  return [
      f"zoo {zoo.root}",
      f"  models: {stats.models}",
      f"  blocks: {stats.stored_blocks} stored ({stats.referenced_blocks} referenced, "
      f"{stats.orphan_blocks} orphan, {stats.missing_blocks} missing)",
      f"  logical bytes: {human_bytes(stats.logical_bytes):>10}  ({stats.logical_bytes} B: every "
      "model's chain, as if stored separately)",
      f"  stored bytes:  {human_bytes(stats.stored_bytes):>10}  ({stats.stored_bytes} B: distinct "
      "blocks)",
      f"  dedup ratio:   {stats.dedup_ratio:.2f}x",
      f"  on disk:       {human_bytes(stats.disk_bytes):>10}  (blocks/, compressed by orbax)",
  ] + _part_lines(stats)


def _part_lines(stats: ZooStats) -> list[str]:
  """Blocks stored as expert-level parts: how many parts, and what sharing experts saved."""
  if not stats.part_blocks:
    return []
  return [
      f"  expert parts:  {stats.stored_parts} stored for {stats.part_blocks} block"
      f"{'s' if stats.part_blocks != 1 else ''}: {human_bytes(stats.part_bytes)} stored "
      f"({stats.part_bytes} B) vs {human_bytes(stats.part_block_bytes)} logical "
      f"({stats.part_block_bytes} B: each such block whole)",
  ]


def rehash_lines(zoo: Zoo, names: list[str]) -> list[str]:
  lines = []
  for name in names:
    before = zoo.reseal(name)
    after = zoo.manifest(name)[integrity.HASH_FIELD]
    was = ("none recorded" if before is None else "unchanged" if before == after
           else f"was {str(before)[:16]}")
    lines.append(f"re-sealed {integrity.where(name)}: {integrity.HASH_FIELD} {after[:16]} ({was})")
  return lines


def gc_lines(report: GcReport) -> list[str]:
  lines = [f"removed block {block_id}" for block_id in report.removed]
  lines.append(f"removed {len(report.removed)} unreferenced blocks, freed "
               f"{human_bytes(report.freed_bytes)} on disk; cleared {report.stale_tmp} stale "
               "temp entries")
  if report.records_removed:
    lines.append(f"removed {report.records_removed} equivalence records of removed blocks or models")
  if report.kept:
    lines.append(f"kept {len(report.kept)} blocks that the last verified manifests of "
                 f"{', '.join(report.kept_for)} reference but no current manifest does (changed "
                 "or removed by hand?); run verify, and gc --force to remove them")
  return lines
