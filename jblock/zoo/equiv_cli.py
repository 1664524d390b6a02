"""What `tools.zoo equiv`, `tools.zoo assemble` and the equivalence part of `show` print."""

from typing import Any

from jblock.errors import InvalidRequestError, NotFoundError
from jblock.zoo import records
from jblock.zoo.sizes import human_bytes


def resolve_block(zoo, prefix: str) -> str:
  """A block id from a unique prefix (at least 6 hex digits) of a stored block's id."""
  prefix = prefix.strip().lower()
  if len(prefix) < 6:
    raise InvalidRequestError("block", f"{prefix!r}: give at least 6 hex digits of a block id")
  found = [b for b in zoo.block_ids() if b.startswith(prefix)]
  if not found:
    raise NotFoundError(f"no block with id {prefix}... in the zoo")
  if len(found) > 1:
    raise InvalidRequestError("block", f"{prefix!r} matches {len(found)} blocks; give more digits")
  return found[0]


def _m(metrics: dict[str, Any], key: str, fmt: str) -> str:
  value = metrics.get(key)
  return "-" if value is None else format(value, fmt)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def record_rows(recs: list[dict[str, Any]]) -> list[str]:
  rows = [("POS", "KIND", "CANDIDATE", "FROM", "CONTEXT", "SPLIT", "REL_L2", "COSINE", "KL",
           "TOP1", "PPL", "DATE")]
  for r in recs:
    m = r["metrics"]
    rows.append((str(r["position"]), r["kind"], r["candidate"][:12],
                 ",".join(r.get("candidate_models") or []) or "-", str(len(r.get("context", []))),
                 r["calibration"]["split"], _m(m, "block_rel_l2", ".4f"),
                 _m(m, "block_cosine", ".5f"), _m(m, "kl", ".5f"), _m(m, "top1", ".4f"),
                 _m(m, "perplexity", ".3f"), r.get("created", "")[:10]))
  return _table(rows)


def equiv_lines(report: dict[str, Any]) -> list[str]:
  calib = report["calibration"]
  lines = [f"equivalence of model {report['model']}: {len(report['records'])} candidates on "
           f"{calib['windows']} windows x {calib['seq_len']} tokens of {calib['source']} "
           f"(fit split, hash {calib['hash'][:12]})"]
  if report["records"]:
    lines += ["  " + line for line in record_rows(report["records"])]
  return lines


def assemble_lines(report: dict[str, Any]) -> list[str]:
  from jblock.zoo.assemble import fmt_metrics
  budget = report["budget"]
  asked = ", ".join(f"{k} {v}" for k, v in budget.items() if v is not None)
  share = report["bytes_saved"] / report["model_bytes"] if report["model_bytes"] else 0.0
  lines = [f"model {report['name']} assembled from {report['original_model']} within {asked}: "
           f"{len(report['substitutions'])} substitutions of {report['candidates_measured']} "
           "candidates measured",
           f"  bytes saved: {human_bytes(report['bytes_saved'])} of "
           f"{human_bytes(report['model_bytes'])} ({share:.1%})"]
  for s in report["substitutions"]:
    lines.append(f"    position {s['position']:3d} {s['kind']:<6} {s['original'][:12]} -> "
                 f"{s['candidate'][:12]} (from {','.join(s['candidate_models']) or '-'}), "
                 f"alone {fmt_metrics(s['alone'])}")
  lines.append(f"  fit split: {fmt_metrics(report['fit'])}")
  lines.append(f"  held-out split ({report['holdout']['windows']} windows): "
               f"{fmt_metrics(report['holdout'])}")
  if report["dropped_on_holdout"]:
    lines.append(f"  dropped on held-out: positions "
                 f"{', '.join(str(d['position']) for d in report['dropped_on_holdout'])}")
  lines.append("  manifest: " + ("written" if report["manifest_written"]
                                 else "unchanged (same chain already in the zoo)"))
  return lines


def show_lines(zoo, name: str) -> list[str]:
  """Appended to `tools.zoo show NAME`: the model's provenance and its equivalence records."""
  from jblock.zoo.assemble import fmt_metrics
  lines = []
  provenance = zoo.manifest(name).get("provenance")
  if provenance:
    budget = ", ".join(f"{k} {v}" for k, v in provenance["budget"].items() if v is not None)
    lines.append(f"  assembled from {provenance['original_model']} within {budget}: "
                 f"{len(provenance['substitutions'])} substitutions, "
                 f"{provenance['bytes_saved']} B saved; held-out "
                 f"{fmt_metrics(provenance['holdout'])}")
    for s in provenance["substitutions"]:
      lines.append(f"    position {s['position']:3d} {s['kind']:<6} {s['original'][:16]} -> "
                   f"{s['candidate'][:16]}")
  recs = records.read_all(zoo.root, name)
  lines.append(f"  equivalence records: {len(recs)}")
  lines += ["    " + line for line in record_rows(recs)] if recs else []
  return lines
