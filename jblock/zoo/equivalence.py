"""Equivalence evaluation: how much replacing one of a model's blocks with another changes it.

For a model and a candidate block of the same kind, compute config and leaf shapes (from the
base or another variant), measured on calibration text or tokens:
  (a) the block's own output on the real inputs the model feeds it: relative L2 error and
      mean per-token cosine similarity against the model's block;
  (b) the model's final next-token distribution against the unmodified model: mean KL
      divergence KL(original || substituted) per token and top-1 agreement (plus the
      substituted model's perplexity on the split);
alone, or combined with substitutions already accepted (the record's `context`). Every
forward runs the chain through the block functions the engine runs (jblock.models.blocks via
jblock.models.reference.jitted_apply, paged KV laid out as the reference path lays it out).

Measurements are stored in the zoo as equivalence records (jblock.zoo.records), keyed by the
model's chain, the position, the candidate, the context and the calibration split's hash: a
measurement already recorded is read back, not recomputed.

A LoRA adapter (a manifest with `deltas`) is measured with its delta blocks applied (one-slot
banks, the engine's per-row LoRA op); at a position with a delta the candidate may be the plain
base block itself (the same block id, the delta dropped): the record names the dropped `delta`
and its `nbytes` are the delta's bytes, what serving the position without it saves.

Calibration: the demo corpus (jblock/train/demo_corpus.txt) by default; any text file
(tokenized with the model's tokenizer.json, or as UTF-8 bytes when the model has none and its
vocabulary holds 256 byte ids), or token ids in a .npy or .json file. The token stream is cut into a
calibration ("fit") part and a held-out tail ("holdout"), each into windows of seq_len tokens.
"""

import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jblock.blocks import EMBED, HEAD, LAYERS, Block
from jblock.errors import InvalidRequestError, JBlockError
from jblock.models import blocks as block_fns
from jblock.models.attention import contiguous_meta
from jblock.models.lora import single_bank
from jblock.models.reference import Model, jitted_apply, runtime_params
from jblock.zoo import records

DEFAULT_CALIBRATION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "train", "demo_corpus.txt")
FIT, HOLDOUT = "fit", "holdout"


class NotACandidateError(InvalidRequestError):
  """A block that cannot stand in for a model's block (other kind, config or shapes)."""

  def __init__(self, message: str):
    JBlockError.__init__(self, message)
    self.field = "candidate"


# ---- calibration data


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Token windows [N, T] int32 for fitting (choosing substitutions) and for held-out checks."""
  fit: np.ndarray
  holdout: np.ndarray
  source: str

  def split(self, name: str) -> np.ndarray:
    if name not in (FIT, HOLDOUT):
      raise ValueError(f"split must be {FIT!r} or {HOLDOUT!r}, got {name!r}")
    windows = self.fit if name == FIT else self.holdout
    if windows.shape[0] == 0:
      raise InvalidRequestError("calibration", f"the calibration set has no {name} windows "
                                "(more tokens or a larger holdout fraction needed)")
    return windows

  def describe(self, name: str) -> dict[str, Any]:
    windows = self.split(name)
    return {"split": name, "hash": windows_hash(windows), "source": self.source,
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}


def windows_hash(windows: np.ndarray) -> str:
  arr = np.ascontiguousarray(windows, dtype="<i4")
  h = hashlib.sha256(json.dumps(list(arr.shape)).encode())
  h.update(arr.tobytes())
  return h.hexdigest()[:32]


def _windows(stream: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
  n = stream.size // seq_len
  windows = stream[:n * seq_len].reshape(n, seq_len)
  if n > max_windows:  # evenly spread over the text, not just its start
    windows = windows[np.linspace(0, n - 1, max_windows).round().astype(int)]
  return windows


def make_calibration(tokens, seq_len: int = 64, max_windows: int = 64, holdout: float = 0.25,
                     source: str = "tokens") -> Calibration:
  """Windows from a token stream (1-D, or a list of sequences, concatenated): the first
  (1 - holdout) of the stream for fitting, the tail held out; at most max_windows each."""
  if isinstance(tokens, (list, tuple)) and tokens and np.ndim(tokens[0]) == 1:
    tokens = np.concatenate([np.asarray(t, np.int64) for t in tokens])
  stream = np.asarray(tokens, np.int64).reshape(-1)
  if not 0.0 <= holdout < 1.0:
    raise InvalidRequestError("holdout", f"must be in [0, 1), got {holdout}")
  if seq_len < 2 or max_windows < 1:
    raise InvalidRequestError("seq_len", f"seq_len must be >= 2 and max_windows >= 1, got "
                              f"{seq_len} and {max_windows}")
  cut = stream.size - int(round(stream.size * holdout))
  fit_part, held_part = stream[:cut], stream[cut:]
  t = min(seq_len, fit_part.size, held_part.size if holdout > 0 else fit_part.size)
  if t < 2:
    raise InvalidRequestError("calibration", f"{stream.size} tokens are too few for a "
                              f"calibration split with holdout {holdout}")
  fit = _windows(fit_part, t, max_windows).astype(np.int32)
  held = (_windows(held_part, t, max_windows) if holdout > 0
          else np.zeros((0, t), np.int64)).astype(np.int32)
  return Calibration(fit, held, source)


def read_tokens(path: str, vocab_size: int, tokenizer_dir: str | None) -> np.ndarray:
  """Token ids from a .npy / .json file, or a text file tokenized for the model."""
  if not os.path.isfile(path):
    raise InvalidRequestError("calibration", f"{path}: no such file")
  if path.endswith(".npy"):
    tokens = np.load(path).reshape(-1)
  elif path.endswith(".json"):
    with open(path) as f:
      data = json.load(f)
    parts = data if data and isinstance(data[0], list) else [data]
    tokens = np.concatenate([np.asarray(p, np.int64) for p in parts])
  else:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    tokenizer_file = os.path.join(tokenizer_dir, "tokenizer.json") if tokenizer_dir else None
    if tokenizer_file and os.path.isfile(tokenizer_file):
      from tokenizers import Tokenizer
      tokens = np.asarray(Tokenizer.from_file(tokenizer_file).encode(text).ids, np.int64)
    elif vocab_size >= 256:
      tokens = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
    else:
      raise InvalidRequestError("calibration", f"the model has no tokenizer.json and a "
                                f"{vocab_size}-token vocabulary: pass token ids (.npy or .json)")
  tokens = np.asarray(tokens, np.int64)
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise InvalidRequestError("calibration", f"{path}: token ids must be in [0, {vocab_size})")
  return tokens


# ---- running chains


def _bar(total: int, desc: str, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
              dynamic_ncols=True)


class ChainRunner:
  """A model's chain over one split's windows, batch by batch, with the engine's block functions.

  Keeps every block's input and the final log-probabilities of the unmodified model, so a
  substitution at position p runs only blocks p..end.
  """

  def __init__(self, blocks: Sequence[Block], windows: np.ndarray, batch_size: int = 16,
               progress: bool = False, deltas: Sequence[Block | None] | None = None):
    self.blocks = list(blocks)
    # A LoRA adapter's delta block per position (None: none there), applied from one-slot banks.
    self.deltas = list(deltas) if deltas is not None else [None] * len(self.blocks)
    self._banks: dict[int, Any] = {}
    self.windows = np.asarray(windows, np.int32)
    self._params: dict[tuple[int, int], Any] = {}
    self._dtype = jnp.asarray(self.blocks[0].params["embedding"][:1]).dtype
    self.batches = []
    for lo in range(0, self.windows.shape[0], batch_size):
      toks = jnp.asarray(self.windows[lo:lo + batch_size])
      b, t = toks.shape
      self.batches.append((toks, contiguous_meta(b, t, 0, t)))
    self.inputs: list[list[Any]] = []  # [batch][position] -> that block's input
    self.ref_logp: list[Any] = []
    nll = 0.0
    with _bar(len(self.batches), "reference", progress) as bar:
      for toks, meta in self.batches:
        xs, x = [], toks
        for i in range(len(self.blocks)):
          xs.append(x)
          x = self.apply(self.blocks, i, x, meta, self.deltas[i])
        self.inputs.append(xs)
        logp = jax.nn.log_softmax(x, axis=-1)
        self.ref_logp.append(logp)
        nll += float(_nll_sum(logp, toks))
        bar.update()
    self.tokens = int(self.windows.shape[0] * self.windows.shape[1])
    self.ref_nll = nll / self.windows.shape[0] / max(1, self.windows.shape[1] - 1)

  def apply(self, chain: Sequence[Block], i: int, x, meta, delta: Block | None = None):
    block = chain[i]
    if delta is not None:
      if i not in self._banks:
        self._banks[i] = single_bank(delta)
      meta = {**meta, "lora": self._banks[i], "adapter": jnp.zeros(x.shape[0], jnp.int32)}
    tied = block.kind == HEAD and block.config.get("tied_to") is not None
    embed = next(b for b in chain if b.kind == EMBED) if tied else None
    # Keyed by object identity; the entry keeps the objects alive so an id is never reused.
    key = (id(block), id(embed))
    entry = self._params.get(key)
    if entry is None:
      entry = (block, embed, jax.tree.map(jnp.asarray, runtime_params(chain, i)))
      self._params[key] = entry
    params = entry[2]
    b, t = x.shape[0], x.shape[1]
    kv = block_fns.init_kv(block.config, b, t, self._dtype) if block.kind == LAYERS else {}
    y, _ = jitted_apply(block)(params, kv, x, meta)
    return y

  def measure(self, substitutions: Mapping[int, Block], target: int | None = None,
              progress: bool = False, desc: str = "measure") -> dict[str, float]:
    """The chain with `substitutions` (position -> block) against the unmodified model.

    target: the position whose block-level error is reported (its candidate's output vs the
    model's own block on the same inputs, which include the other substitutions' effects).
    A substituted position runs without its delta (an adapter's own block substituted for
    itself is the delta dropped).
    """
    if target is not None and target not in substitutions:
      raise ValueError(f"target position {target} is not substituted")
    chain = list(self.blocks)
    for p, block in substitutions.items():
      chain[p] = block
    start = min(substitutions) if substitutions else len(chain)
    kl = top1 = nll = 0.0
    err2 = ref2 = cos = 0.0
    block_tokens = 0
    with _bar(len(self.batches), desc, progress) as bar:
      for n, (toks, meta) in enumerate(self.batches):
        if start >= len(chain):
          logp = self.ref_logp[n]
        else:
          x = self.inputs[n][start]
          for i in range(start, len(chain)):
            y = self.apply(chain, i, x, meta, None if i in substitutions else self.deltas[i])
            if i == target:
              y0 = self.apply(self.blocks, i, x, meta, self.deltas[i])
              e2, r2, c, count = _block_error(y, y0)
              err2, ref2, cos, block_tokens = err2 + e2, ref2 + r2, cos + c, block_tokens + count
            x = y
          logp = jax.nn.log_softmax(x, axis=-1)
        ref = self.ref_logp[n]
        kl += float(jnp.sum(jnp.exp(ref) * (ref - logp)))
        top1 += float(jnp.sum(jnp.argmax(ref, -1) == jnp.argmax(logp, -1)))
        nll += float(_nll_sum(logp, toks))
        bar.update()
    rows, t = self.windows.shape
    out = {"kl": max(0.0, kl / self.tokens), "top1": top1 / self.tokens, "tokens": self.tokens,
           "perplexity": math.exp(nll / rows / max(1, t - 1)),
           "perplexity_original": math.exp(self.ref_nll)}
    if target is not None:
      out["block_rel_l2"] = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
      out["block_cosine"] = cos / block_tokens
    return out


def _nll_sum(logp, toks):
  """Sum of -log p(next token) over every position that has a next token."""
  picked = jnp.take_along_axis(logp[:, :-1], toks[:, 1:, None].astype(jnp.int32), axis=-1)
  return -jnp.sum(picked)


def _block_error(y, y0):
  y, y0 = y.astype(jnp.float32), y0.astype(jnp.float32)
  y, y0 = y.reshape(-1, y.shape[-1]), y0.reshape(-1, y0.shape[-1])
  d = y - y0
  dot = jnp.sum(y * y0, -1)
  norms = jnp.linalg.norm(y, axis=-1) * jnp.linalg.norm(y0, axis=-1)
  cos = jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0),
                  jnp.where(jnp.all(d == 0, -1), 1.0, 0.0))
  return (float(jnp.sum(d * d)), float(jnp.sum(y0 * y0)), float(jnp.sum(jnp.clip(cos, -1.0, 1.0))),
          int(y.shape[0]))


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
    self.manifest = zoo.manifest(model)
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
    rel = self.manifest.get("tokenizer")
    return os.path.join(self.zoo.root, rel) if rel else None

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
                                  f"the zoo at {self.zoo.root}")
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
  with _bar(len(jobs), f"equivalence {model}", progress) as bar:
    for p, c in jobs:
      results.append(eq.evaluate(p, c))
      bar.update()
  return {"model": model, "model_chain": eq.digest, "calibration": eq.calibration.describe(FIT),
          "records": results}
