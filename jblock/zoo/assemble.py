"""Adaptive assembly: a new model whose chain takes equivalent blocks of other models, within a
loss budget measured against the original.

  report = assemble(zoo, "variant-3", "variant-3-lean", min_top1=0.97)

1. Every candidate (jblock.zoo.equivalence) is measured alone on the calibration ("fit")
   split; missing equivalence records are evaluated and stored, existing ones read back.
2. Greedy: candidates within the budget alone, in order of bytes saved per unit of measured
   loss (loss = the budget's share used: KL / max_kl + (1 - top1) / (1 - min_top1)), are tried
   one by one on top of those already accepted; one is accepted when the combined loss of all
   accepted substitutions stays within budget (each combined measurement is a record too).
3. Held-out check: the accepted set is measured on the held-out split; while that exceeds the
   budget, the last accepted substitution is dropped. The result never exceeds the budget on
   the held-out split it was measured on.
   For a delta model (a LoRA adapter or a compressed full fine-tune) a candidate may be the
   base block itself: the position is served without its delta (the plain base block), saving
   the delta's bytes.
4. The new model is a normal manifest (a chain of block ids) recording its provenance:
   original model, substitutions, budget, calibration hashes, measured loss and perplexity on
   the held-out split. It is served like any model; the original stays as it was.
"""

import dataclasses
import datetime
import math
from typing import Any, Sequence

from jblock.errors import InvalidRequestError
from jblock.zoo.calibration import FIT, HOLDOUT
from jblock.zoo.chain_runner import progress_bar
from jblock.zoo.equivalence import Equivalence

_EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class Budget:
  """Loss a tenant accepts: mean KL(original || assembled) <= max_kl, top-1 agreement >= min_top1."""
  max_kl: float | None = None
  min_top1: float | None = None

  def __post_init__(self):
    if self.max_kl is None and self.min_top1 is None:
      raise InvalidRequestError("budget", "give max_kl, min_top1 or both")
    if self.max_kl is not None and not self.max_kl >= 0:
      raise InvalidRequestError("max_kl", f"must be >= 0, got {self.max_kl}")
    if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
      raise InvalidRequestError("min_top1", f"must be in [0, 1], got {self.min_top1}")

  def ok(self, metrics: dict[str, float]) -> bool:
    return ((self.max_kl is None or metrics["kl"] <= self.max_kl)
            and (self.min_top1 is None or metrics["top1"] >= self.min_top1))

  def loss(self, metrics: dict[str, float]) -> float:
    """The share of the budget a measurement uses (1.0 = all of it)."""
    used = 0.0
    if self.max_kl is not None:
      used += metrics["kl"] / max(self.max_kl, _EPS)
    if self.min_top1 is not None:
      used += (1.0 - metrics["top1"]) / max(1.0 - self.min_top1, _EPS)
    return used

  def to_dict(self) -> dict[str, float | None]:
    return {"max_kl": self.max_kl, "min_top1": self.min_top1}


def plan(eq: Equivalence, budget: Budget, sources: Sequence[str] | None = None,
         any_position: bool = False, say=None) -> dict[str, Any]:
  """Steps 1-3 above; returns the substitutions and every measurement behind them."""
  say = say or (lambda _: None)
  options, alone = [], []
  jobs = [(p, c) for p in eq.positions() for c in eq.candidates(p, sources, any_position)]
  say(f"{eq.name}: {len(jobs)} candidates at {len({p for p, _ in jobs})} positions")
  with progress_bar(len(jobs), f"alone {eq.name}", eq.progress) as bar:
    for p, c in jobs:
      record = eq.evaluate(p, c.block_id)
      alone.append(_brief(record))
      if budget.ok(record["metrics"]):
        score = record["nbytes"] / max(budget.loss(record["metrics"]), _EPS)
        options.append((-score, p, c.block_id, record))
      bar.update()
  options.sort(key=lambda o: (o[0], o[1], o[2]))

  accepted: dict[int, str] = {}
  steps = []
  with progress_bar(len(options), f"combined {eq.name}", eq.progress) as bar:
    for _, p, c, record in options:
      bar.update()
      if p in accepted:
        continue
      combined = eq.evaluate(p, c, context=accepted) if accepted else record
      ok = budget.ok(combined["metrics"])
      steps.append({**_brief(combined), "accepted": ok})
      if ok:
        accepted[p] = c
  say(f"{eq.name}: {len(accepted)} substitutions within budget on the fit split")

  order = [s["position"] for s in steps if s["accepted"]]
  held = eq.measure(accepted, HOLDOUT)
  dropped = []
  while not budget.ok(held):
    p = order.pop()
    dropped.append({"position": p, "candidate": accepted.pop(p), "holdout_before": held})
    held = eq.measure(accepted, HOLDOUT)
  if dropped:
    say(f"{eq.name}: dropped {len(dropped)} substitutions to stay within budget on held-out text")
  return {"accepted": [(p, accepted[p]) for p in order], "alone": alone, "steps": steps,
          "dropped": dropped, "fit": eq.measure(accepted, FIT), "holdout": held}


def _brief(record: dict[str, Any]) -> dict[str, Any]:
  return {k: record[k] for k in ("position", "kind", "block", "candidate", "candidate_models",
                                 "nbytes", "context", "metrics", "key")}


def assemble(zoo, model: str, name: str, max_kl: float | None = None,
             min_top1: float | None = None, sources: Sequence[str] | None = None,
             calibration=None, any_position: bool = False, overwrite: bool = False,
             progress: bool = False, say=None, **options) -> dict[str, Any]:
  """Assembles `name` from `model` within the budget and publishes its manifest; returns the
  provenance recorded there (plus `manifest_written`). options: Equivalence's (seq_len,
  max_windows, holdout, batch_size)."""
  budget = Budget(max_kl, min_top1)
  if name == model:
    raise InvalidRequestError("name", "the assembled model needs a new name (the original stays)")
  from jblock.zoo import manifest as manifests
  manifests.check_name(name)
  eq = Equivalence(zoo, model, calibration, progress=progress, **options)
  eq.calibration.split(HOLDOUT)  # fail before measuring anything when there is no held-out text
  result = plan(eq, budget, sources, any_position, say)

  chain = list(eq.chain)
  block_bytes = list(eq.manifest["block_bytes"])
  deltas = list(eq.delta_ids)
  delta_bytes = list(eq.manifest.get("delta_bytes") or [0] * len(chain))
  substitutions = []
  by_position = {s["position"]: s for s in result["steps"] if s["accepted"]}
  for p, c in result["accepted"]:
    chain[p] = c
    block_bytes[p] = int(zoo.block_record(c)["nbytes"])
    deltas[p], delta_bytes[p] = None, 0  # a delta is over its own block: substituted, it goes
    step = by_position[p]
    alone = next(a for a in result["alone"] if a["position"] == p and a["candidate"] == c)
    substitutions.append({"position": p, "kind": step["kind"], "original": eq.chain[p],
                          "candidate": c, "candidate_models": step["candidate_models"],
                          "dropped_delta": eq.delta_ids[p],
                          "bytes": step["nbytes"], "alone": alone["metrics"],
                          "combined_at_acceptance": step["metrics"]})
  model_bytes = sum(eq.manifest["block_bytes"]) + sum(eq.manifest.get("delta_bytes") or [])
  saved = sum(s["bytes"] for s in substitutions)
  provenance = {
      "original_model": model, "original_chain": eq.chain, "budget": budget.to_dict(),
      "substitutions": substitutions,
      "bytes_saved": saved, "model_bytes": model_bytes,
      "calibration": eq.calibration.describe(FIT), "fit": result["fit"],
      "holdout": {**eq.calibration.describe(HOLDOUT), **result["holdout"]},
      "dropped_on_holdout": result["dropped"],
      "candidates_measured": len(result["alone"]),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  data = dict(eq.manifest)
  lineage = dict(data.get("lineage") or {})
  lineage["assembled_from"] = model
  data.update(name=name, chain=chain, block_bytes=block_bytes, lineage=lineage,
              provenance=provenance, created=provenance["created"])
  if any(deltas):  # an adapter keeps the deltas not dropped
    data.update(deltas=deltas, delta_bytes=delta_bytes)
  else:  # every delta dropped: a plain chain, served like the base it now is
    for key in ("deltas", "delta_bytes", "adapter"):
      data.pop(key, None)
  tokenizer = zoo.tokenizer_path(eq.manifest)
  written = zoo.publish_manifest(name, data, tokenizer_dir=tokenizer, overwrite=overwrite)
  return {"name": name, **provenance, "manifest_written": written}


def pareto(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The points (bytes_saved, loss) no other point beats on both; sorted by loss."""
  out = []
  for p in sorted(points, key=lambda q: (q["loss"], -q["bytes_saved"])):
    if not out or p["bytes_saved"] > out[-1]["bytes_saved"]:
      out.append(p)
  return out


def fmt_metrics(m: dict[str, float]) -> str:
  ppl = m.get("perplexity")
  base = m.get("perplexity_original")
  text = f"KL {m['kl']:.5f}, top-1 {m['top1']:.4f}"
  if ppl is not None and base is not None and math.isfinite(ppl):
    text += f", perplexity {ppl:.3f} (original {base:.3f})"
  return text
