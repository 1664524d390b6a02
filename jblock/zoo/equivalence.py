"""Equivalence evaluation: how much replacing one of a model's blocks with another changes it.

For a model and a candidate block of the same kind, compute config and leaf shapes (from the
base or another variant), measured on calibration text or tokens:
  (a) the block's own output on the real inputs the model feeds it: relative L2 error and
      mean per-token cosine similarity against the model's block;
  (b) the model's final next-token distribution against the unmodified model: mean KL
      divergence KL(original || substituted) per token and top-1 agreement (plus the
      substituted model's perplexity on the split);
alone, or combined with substitutions already accepted (the record's `context`). Every
forward runs the chain through the block functions the engine runs (chain_runner.py).

Measurements are stored in the zoo as equivalence records (jblock.zoo.records), keyed by the
model's chain, the position, the candidate, the context and the calibration split's hash: a
measurement already recorded is read back, not recomputed.

A delta model (a manifest with `deltas`: a LoRA adapter or a compressed full fine-tune) is
measured with its delta blocks applied (one-slot banks, the engine's per-row ops); at a position with a delta the candidate may be the plain
base block itself (the same block id, the delta dropped): the record names the dropped `delta`
and its `nbytes` are the delta's bytes, what serving the position without it saves.

Calibration (calibration.py): the demo corpus by default, any text file or token ids, cut into
a "fit" part and a held-out "holdout" tail of seq_len-token windows.
"""

import dataclasses
import datetime
import os
from typing import Any, Iterable, Mapping, Sequence

from jblock.blocks import EMBED, Block
from jblock.errors import InvalidRequestError, JBlockError
from jblock.models.reference import Model
from jblock.zoo import records
from jblock.zoo.calibration import DEFAULT_CALIBRATION, FIT, HOLDOUT, Calibration
from jblock.zoo.calibration import make_calibration, read_tokens
from jblock.zoo.calibration import windows_hash
from jblock.zoo.chain_runner import ChainRunner, progress_bar


class NotACandidateError(InvalidRequestError):
  """A block that cannot stand in for a model's block (other kind, config or shapes)."""

  def __init__(self, message: str):
    JBlockError.__init__(self, message)
    self.field = "candidate"


# ---- candidates


def candidate_problem(block: Mapping[str, Any], candidate: Mapping[str, Any]) -> str | None:
  """Why `candidate` (a block.json record) cannot stand in for `block`; None when it can.

  Same kind, same compute config (so the same block function) and the same leaves (paths,
  dtypes, shapes). A tied head's config names its embedding, so only a head tied to the same
  table qualifies.
  """
  if candidate["kind"] != block["kind"]:
    return f"kind {candidate['kind']} is not {block['kind']}"
  if candidate["config"] != block["config"]:
    differ = sorted(k for k in set(block["config"]) | set(candidate["config"])
                    if block["config"].get(k) != candidate["config"].get(k))
    return f"compute config differs in {', '.join(differ)}"
  if candidate["leaves"] != block["leaves"]:
    return "param shapes or dtypes differ"
  return None


@dataclasses.dataclass(frozen=True)
class Candidate:
  block_id: str
  models: tuple[str, ...]  # models whose chain holds this block (where it comes from)


class Equivalence:
  """Equivalence evaluation for one model of a zoo, on one calibration set.

    eq = Equivalence(zoo, "variant-1")                       # demo corpus
    eq.candidates(3)                                         # same-shape blocks at position 3
    eq.evaluate(3, block_id)                                 # alone; a stored record
    eq.evaluate(5, other_id, context={3: block_id})          # combined with an accepted one
    eq.measure({3: block_id, 5: other_id}, split="holdout")  # the whole substitution set
  """

  def __init__(self, zoo, model: str, calibration=None, seq_len: int = 64,
               max_windows: int = 64, holdout: float = 0.25, batch_size: int = 16,
               progress: bool = False):
    self.zoo = zoo
    self.name = model
    self.manifest = zoo.checked_manifest(model)  # an assembled model is sealed from it
    self.chain: list[str] = list(self.manifest["chain"])
    self.delta_ids: list[str | None] = list(self.manifest.get("deltas") or [None] * len(self.chain))
    self.digest = records.chain_digest(self.chain, self.delta_ids)
    self.model: Model = zoo.load_model(model)
    self.deltas = [zoo.load_block(d) if d else None for d in self.delta_ids]
    self.progress = progress
    self.batch_size = batch_size
    vocab = self.model.config.vocab_size
    if isinstance(calibration, Calibration):
      self.calibration = calibration
    else:
      if calibration is None or isinstance(calibration, str):
        path = calibration or DEFAULT_CALIBRATION
        tokens = read_tokens(path, vocab, self._tokenizer_dir())
        source = os.path.abspath(path)
      else:
        tokens, source = calibration, "tokens"
      self.calibration = make_calibration(tokens, seq_len, max_windows, holdout, source)
    for name in (FIT, HOLDOUT):
      windows = self.calibration.fit if name == FIT else self.calibration.holdout
      if windows.size and windows.max() >= vocab:
        raise InvalidRequestError("calibration", f"token ids must be in [0, {vocab})")
    self._runners: dict[str, ChainRunner] = {}
    self._blocks: dict[str, Block] = {}
    self._records_cache: dict[str, dict[str, Any]] = {}
    self._chains: dict[str, list[str]] = {}

  def _tokenizer_dir(self) -> str | None:
    return self.zoo.tokenizer_path(self.manifest)

  def runner(self, split: str = FIT) -> ChainRunner:
    if split not in self._runners:
      self._runners[split] = ChainRunner(self.model.blocks, self.calibration.split(split),
                                         self.batch_size, self.progress, self.deltas)
    return self._runners[split]

  def block(self, block_id: str) -> Block:
    if block_id not in self._blocks:
      if block_id in self.chain:
        block = self.model.blocks[self.chain.index(block_id)]
      else:
        block = self.zoo.load_block(block_id)
      self._blocks[block_id] = block
    return self._blocks[block_id]

  def chain_of(self, model: str) -> list[str]:
    if model not in self._chains:
      self._chains[model] = list(self.zoo.manifest(model)["chain"])
    return self._chains[model]

  def _record_of(self, block_id: str) -> dict[str, Any]:
    if block_id not in self._records_cache:
      self._records_cache[block_id] = self.zoo.block_record(block_id)
    return self._records_cache[block_id]

  # -- what may be substituted

  def positions(self) -> list[int]:
    """Chain positions that take a substitute. A tied model's embed is also its head's table
    (the head's config names it), so it is not substituted."""
    tied = self.model.blocks[-1].config.get("tied_to") is not None
    return [i for i, b in enumerate(self.model.blocks) if not (tied and b.kind == EMBED)]

  def check_candidate(self, position: int, block_id: str) -> None:
    if not 0 <= position < len(self.chain):
      raise InvalidRequestError("position", f"model {self.name!r} has positions 0.."
                                f"{len(self.chain) - 1}, got {position}")
    if position not in self.positions():
      raise NotACandidateError(f"position {position} of model {self.name!r} is a tied embedding "
                               "(its head reads the same table); it is not substituted")
    problem = candidate_problem(self._record_of(self.chain[position]), self._record_of(block_id))
    if problem:
      raise NotACandidateError(f"block {block_id[:16]} is not a candidate for position "
                               f"{position} of model {self.name!r}: {problem}")

  def candidates(self, position: int, sources: Iterable[str] | None = None,
                 any_position: bool = False) -> list[Candidate]:
    """Blocks of other models that can stand in at `position`: by default the block at the
    same position of each source model (default sources: the model's base_model when it is in
    the zoo, else every other model); any_position: any position of theirs."""
    own = self.chain[position]
    if position not in self.positions():
      return []
    found: dict[str, list[str]] = {}
    if self.delta_ids[position]:  # an adapter's base block without the delta
      found[own] = [(self.manifest.get("adapter") or {}).get("base_model") or self.name]
    for model in self.sources(sources):
      chain = self.chain_of(model)
      ids = chain if any_position else chain[position:position + 1]
      if not any_position and len(chain) != len(self.chain):
        continue
      for block_id in ids:
        if block_id == own or not self.zoo.has_block(block_id):
          continue
        if candidate_problem(self._record_of(own), self._record_of(block_id)) is None:
          found.setdefault(block_id, []).append(model)
    return [Candidate(b, tuple(sorted(set(m)))) for b, m in sorted(found.items())]

  def sources(self, sources: Iterable[str] | None = None) -> list[str]:
    models = self.zoo.models()
    if sources is not None:
      sources = list(sources)
      unknown = [m for m in sources if m not in models]
      if unknown:
        raise InvalidRequestError("candidates", f"no model {', '.join(map(repr, unknown))} in "
                                  "the zoo")
      return [m for m in sources if m != self.name]
    base = ((self.manifest.get("adapter") or {}).get("base_model")
            or (self.manifest.get("lineage") or {}).get("base_model"))
    if base and base in models and base != self.name:
      return [base]
    return [m for m in models if m != self.name]

  # -- measuring

  def evaluate(self, position: int, candidate: str, context: Mapping[int, str] | None = None,
               split: str = FIT, store: bool = True, reuse: bool = True) -> dict[str, Any]:
    """The record for substituting `candidate` at `position`, on top of `context` (position ->
    block id, already accepted substitutions): read from the zoo when measured before."""
    context = {int(p): b for p, b in (context or {}).items()}
    if position in context:
      raise InvalidRequestError("context", f"position {position} is both the target and in the "
                                "context")
    for p, b in [*context.items(), (position, candidate)]:
      self.check_candidate(p, b)
    calib = self.calibration.describe(split)
    key = records.record_key(self.digest, position, candidate, calib["hash"], context.items())
    if reuse:
      found = records.read(self.zoo.root, self.name, key)
      if found is not None:
        return found
    subs = {p: self.block(b) for p, b in context.items()}
    subs[position] = self.block(candidate)
    metrics = self.runner(split).measure(subs, target=position, progress=self.progress,
                                         desc=f"position {position}")
    record = {
        "format": records.FORMAT, "key": key, "model": self.name, "model_chain": self.digest,
        "position": position, "kind": self.model.blocks[position].kind,
        "block": self.chain[position], "candidate": candidate,
        "candidate_models": sorted(m for m in self.zoo.models() if m != self.name
                                   and candidate in self.chain_of(m)),
        "nbytes": self.saved_bytes(position, candidate),
        "delta": self.delta_ids[position],  # dropped by any substitution (it is over its block)
        "context": sorted([p, b] for p, b in context.items()),
        "calibration": calib, "metrics": metrics,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if store:
      records.write(self.zoo.root, self.zoo.tmp_dir, record)
    return record

  def saved_bytes(self, position: int, candidate: str) -> int:
    """Bytes the model no longer holds of its own with `candidate` at `position`: the block's
    (and its delta's), or only the delta's when the candidate is the block itself."""
    delta = self.delta_ids[position]
    delta_bytes = int(self._record_of(delta)["nbytes"]) if delta else 0
    if candidate == self.chain[position]:
      return delta_bytes
    return int(self._record_of(self.chain[position])["nbytes"]) + delta_bytes

  def measure(self, substitutions: Mapping[int, str], split: str = FIT) -> dict[str, float]:
    """Combined loss of a substitution set (position -> block id) against the original model."""
    for p, b in substitutions.items():
      self.check_candidate(p, b)
    return self.runner(split).measure({p: self.block(b) for p, b in substitutions.items()},
                                      progress=self.progress, desc=f"{split} check")


def evaluate(zoo, model: str, candidates: Sequence[str] | None = None,
           positions: Sequence[int] | None = None, sources: Sequence[str] | None = None,
           calibration=None, any_position: bool = False, progress: bool = False,
           **options) -> dict[str, Any]:
  """Equivalence report of a model: every (position, candidate) measured alone.

  candidates: explicit block ids (each must fit at the positions given, or every position it
  fits); default: `Equivalence.candidates` for each position. Returns a JSON-able report.
  """
  eq = Equivalence(zoo, model, calibration, progress=progress, **options)
  positions = list(positions) if positions is not None else eq.positions()
  jobs = []
  for p in positions:
    if candidates is None:
      jobs += [(p, c.block_id) for c in eq.candidates(p, sources, any_position)]
    else:
      for c in candidates:
        if len(positions) == 1:
          eq.check_candidate(p, c)  # one position asked for: an unfit candidate is an error
          jobs.append((p, c))
        elif p in eq.positions() and candidate_problem(
            eq._record_of(eq.chain[p]), eq._record_of(c)) is None:
          jobs.append((p, c))
  results = []
  with progress_bar(len(jobs), f"equivalence {model}", progress) as bar:
    for p, c in jobs:
      results.append(eq.evaluate(p, c))
      bar.update()
  return {"model": model, "model_chain": eq.digest, "calibration": eq.calibration.describe(FIT),
          "records": results}


# windows_hash and make_calibration stay importable from here for the callers that read them so.
__all__ = ["Candidate", "DEFAULT_CALIBRATION", "Equivalence", "FIT", "HOLDOUT",
           "NotACandidateError", "candidate_problem", "evaluate", "make_calibration",
           "windows_hash"]
