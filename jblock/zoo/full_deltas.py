"""Full fine-tunes in the zoo as compressed delta blocks over their base model's chain.

`convert_full_delta` converts an HF fine-tune of a zoo model block by block:
  - a block identical to the base's is shared (its id is the base's);
  - a layers, embed or head block becomes a qdelta block (jblock.convert.full_delta) over the
    base's block, served through the base's instance from its adapter bank, so the fine-tune
    runs through the base's whole chain (one fused call per step for all its fine-tunes);
  - a tied model's embed and head, and layers the bank cannot express (mixture-of-experts), are
    stored whole.

Encodings (`method`): bitdelta (its scales then distilled on the calibration text:
jblock.convert.delta_distill), int4, int8, none (every changed block whole), or auto: every encoded
block starts at bitdelta and, while the whole model's KL(fine-tune ‖ served) on the calibration
windows is over `max_kl` or its top-1 agreement under `min_top1`, the block with the largest
block-level error moves to the next larger encoding (bitdelta -> int4 -> int8 -> whole).

The manifest is the base's with `chain` (shared or whole ids), `deltas` (the qdelta ids per
position), `adapter` {"base_model", "peft_type": "DELTA"} and `full_delta`: the method, the
encoding chosen per position, the distillation's KL before and after, and the measured KL and
top-1 on the fit and held-out calibration windows. Everything is computed before anything is
written, so a failed conversion leaves the zoo as it was.
"""

import dataclasses
import datetime
import os
from typing import Any, Callable

from jblock.blocks import HEAD, LAYERS, Block
from jblock.convert import full_delta, hf
from jblock.errors import ConversionError, NotFoundError
from jblock.models import qdelta
from jblock.convert.delta_distill import DistillConfig, distill
from jblock.zoo import atomic
from jblock.zoo import manifest as manifests
from jblock.zoo.calibration import DEFAULT_CALIBRATION, make_calibration, read_tokens
from jblock.zoo.chain_runner import ChainRunner
from jblock.zoo.manifest import ModelExistsError
from jblock.zoo.reports import ConvertReport

AUTO, NONE = "auto", "none"
ENCODINGS = (AUTO,) + qdelta.METHODS + (NONE,)
WHOLE = "whole"
_LADDER = qdelta.METHODS + (WHOLE,)


@dataclasses.dataclass(frozen=True)
class DeltaOptions:
  method: str = AUTO
  calibration: str | None = None  # text/.npy/.json file; default: the demo corpus
  max_kl: float = 0.005  # auto's bounds, on the calibration fit windows
  min_top1: float = 0.99
  distill_steps: int = 200
  seq_len: int = 64
  max_windows: int = 64


def _calibration(opts: DeltaOptions, vocab_size: int, tokenizer_dir: str | None):
  path = opts.calibration or DEFAULT_CALIBRATION
  if opts.calibration and not os.path.isfile(path):
    raise ConversionError(f"--calibration={path}: no such file")
  tokens = read_tokens(path, vocab_size, tokenizer_dir)
  return make_calibration(tokens, seq_len=opts.seq_len, max_windows=opts.max_windows)


def _encode(bases, base_ids, ft_chain, positions, method) -> dict[int, Block | None]:
  """position -> the qdelta block at `method`, or None where the bank cannot express it."""
  out = {}
  for p in positions:
    try:
      out[p] = full_delta.compress(bases[p], base_ids[p], ft_chain[p], method)
    except full_delta.UnsupportedDeltaError:
      out[p] = None
  return out


def plan_encodings(ft_chain, bases, base_ids, positions, fit, opts: DeltaOptions,
                   say: Callable[[str], None]) -> tuple[dict[int, Block | None], dict[str, Any]]:
  """The delta block (None = whole) per changed layers position, and the distillation record."""
  runner = ChainRunner(ft_chain, fit)
  choice = {p: (opts.method if opts.method != AUTO else qdelta.BITDELTA) for p in positions}
  encoded = {m: None for m in qdelta.METHODS}

  def blocks_at(method):
    if encoded[method] is None:
      encoded[method] = _encode(bases, base_ids, ft_chain, positions, method)
      if method == qdelta.BITDELTA:
        todo = {p: d for p, d in encoded[method].items() if d is not None}
        if todo and opts.distill_steps > 0:
          say(f"distilling bitdelta scales of {len(todo)} blocks ({opts.distill_steps} steps)")
          result = distill(ft_chain, bases, todo, fit,
                           DistillConfig(steps=opts.distill_steps), progress=say)
          encoded[method].update(result.deltas)
          record["distill"] = {"steps": opts.distill_steps, "kl_start": result.kl_start,
                               "kl_end": result.kl_end}
    return encoded[method]

  def current():
    out = {}
    for p, m in choice.items():
      out[p] = None if m == WHOLE else blocks_at(m)[p]
      if out[p] is None:
        choice[p] = WHOLE
    return out

  def measure(deltas, target=None):
    subs = {p: full_delta.materialize(bases[p], d) for p, d in deltas.items() if d is not None}
    return runner.measure(subs, target=target) if subs else {"kl": 0.0, "top1": 1.0}

  record: dict[str, Any] = {}
  deltas = current()
  if opts.method == AUTO:
    errors: dict[tuple[int, str], float] = {}
    for _ in range(len(positions) * len(_LADDER)):
      m = measure(deltas)
      say(f"auto: {sorted(choice.items())}: KL {m['kl']:.5f}, top-1 {m['top1']:.4f}")
      if m["kl"] <= opts.max_kl and m["top1"] >= opts.min_top1:
        break
      open_ = [p for p in positions if choice[p] != WHOLE]
      if not open_:
        break
      for p in open_:
        if (p, choice[p]) not in errors:
          errors[(p, choice[p])] = measure({p: deltas[p]}, target=p)["block_rel_l2"]
      worst = max(open_, key=lambda p: errors[(p, choice[p])])
      choice[worst] = _LADDER[_LADDER.index(choice[worst]) + 1]
      deltas = current()
  record["encodings"] = dict(choice)
  return deltas, record


def _tied(chain) -> bool:
  """A head that reads the embed block's table: the bank cannot give it a row's delta of that
  table, so such a model's embed and head are stored whole."""
  return any(b.kind == HEAD and b.config.get("tied_to") for b in chain)


def convert_full_delta(zoo, hf_dir: str, base: str, name: str, opts: DeltaOptions = DeltaOptions(),
                       overwrite: bool = False,
                       progress: Callable[[str], None] | None = None) -> ConvertReport:
  """Converts the HF fine-tune in `hf_dir` into `zoo` as model `name` over zoo model `base`."""
  say = progress or (lambda _: None)
  manifests.check_name(name)
  if opts.method not in ENCODINGS:
    raise ConversionError(f"--delta={opts.method}: one of {', '.join(ENCODINGS)}")
  try:
    base_manifest = zoo.checked_manifest(base)  # a delta model must not inherit a tampered chain
  except NotFoundError as e:
    raise NotFoundError(f"--delta_base={base}: no such model in the zoo") from e
  if base_manifest.get("deltas"):
    raise ConversionError(f"--delta_base={base} is itself a delta model; name its base instead")
  conversion = (base_manifest.get("lineage") or {}).get("conversion") or {}
  dtype = conversion.get("dtype", "float32")
  layers_per_block = conversion.get("layers_per_block", 1)
  converted = hf.convert(hf_dir, dtype=dtype, layers_per_block=layers_per_block, progress=progress)
  base_ids = list(base_manifest["chain"])
  if len(converted.blocks) != len(base_ids):
    raise ConversionError(f"{hf_dir}: {len(converted.blocks)} blocks, the base {base} has "
                          f"{len(base_ids)} (different depth or --layers_per_block)")
  bases = {p: zoo.load_block(i) for p, i in enumerate(base_ids)}
  ft_chain = list(converted.blocks)
  ft_ids = [b.id for b in ft_chain]
  for p, (b, f) in enumerate(zip(bases.values(), ft_chain)):
    full_delta.check_compatible(b, f, f"block {p} ({b.kind})")
  changed = [p for p in range(len(ft_ids)) if ft_ids[p] != base_ids[p]]
  positions = [p for p in changed if ft_chain[p].kind == LAYERS or not _tied(ft_chain)]
  say(f"{len(changed)} of {len(ft_ids)} blocks differ from {base}; {len(positions)} to encode "
      f"({opts.method})")
  record: dict[str, Any] = {"encodings": {}}
  deltas: dict[int, Block | None] = {}
  cal = _calibration(opts, converted.config.vocab_size, hf_dir)
  if positions and opts.method != NONE:
    deltas, record = plan_encodings(ft_chain, bases, base_ids, positions, cal.fit, opts, say)
  final = {p: d for p, d in deltas.items() if d is not None}
  losses = {}
  for split, windows in (("fit", cal.fit), ("held_out", cal.holdout)):
    if windows.size:
      runner = ChainRunner(ft_chain, windows)
      m = runner.measure({p: full_delta.materialize(bases[p], d) for p, d in final.items()})
      losses[split] = {"kl": m["kl"], "top1": m["top1"], "tokens": m["tokens"]}
  chain = [base_ids[p] if p not in changed or p in final else ft_ids[p] for p in range(len(ft_ids))]
  delta_ids = [final[p].id if p in final else None for p in range(len(ft_ids))]
  whole = {ft_ids[p]: ft_chain[p] for p in changed if p not in final}
  blocks = {**whole, **{d.id: d for d in final.values()}}

  previous = None
  try:
    previous = zoo.manifest(name)
  except NotFoundError:
    pass
  if previous is not None and not overwrite and (previous["chain"], previous.get("deltas")) != (
      chain, delta_ids):
    raise ModelExistsError(f"model {name!r} already exists with a different chain; "
                           "pass overwrite=True (--overwrite) to replace it")
  written, reused, bytes_written = [], [], 0
  with zoo.writing():
    for block_id, block in blocks.items():
      if not zoo.has_block(block_id) and zoo.write_block(block, block_id):
        say(f"{block.kind} block {block_id[:12]}: writing {block.nbytes} bytes")
        written.append(block_id)
        bytes_written += block.nbytes
      else:
        reused.append(block_id)
    block_bytes = [ft_chain[p].nbytes if chain[p] == ft_ids[p] and p in changed
                   else base_manifest["block_bytes"][p] for p in range(len(chain))]
    data = {
        **base_manifest,
        "name": name,
        "hf_config": converted.hf_config,
        "chain": chain,
        "block_bytes": block_bytes,
        "deltas": delta_ids,
        "delta_bytes": [final[p].nbytes if p in final else 0 for p in range(len(chain))],
        "adapter": {"base_model": base, "peft_type": "DELTA", "method": opts.method},
        "full_delta": {
            "base_model": base, "method": opts.method,
            "encodings": {str(p): ("shared" if p not in changed else
                                   final[p].config["method"] if p in final else WHOLE)
                          for p in range(len(chain))},
            "bounds": {"max_kl": opts.max_kl, "min_top1": opts.min_top1},
            "losses": losses, **{k: v for k, v in record.items() if k == "distill"},
        },
        "lineage": {"base_model": base, "source_dir": os.path.abspath(hf_dir),
                    "conversion": {"dtype": dtype, "layers_per_block": layers_per_block,
                                   "kind": "delta"}},
        "tokenizer": None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    tokenizer_src = hf_dir if manifests.tokenizer_files(hf_dir) else (
        zoo.tokenizer_path(base_manifest))
    if previous is not None and not overwrite:
      manifest_written = False
    else:
      with atomic.temp_dir(zoo.tmp_dir) as empty:
        manifest_written = zoo.publish_model(name, data, tokenizer_src or empty, overwrite)
  say(f"manifest models/{name}.json " + ("written" if manifest_written else "already there"))
  return ConvertReport(name=name, chain=chain, written=written, reused=reused,
                       bytes_written=bytes_written,
                       model_bytes=sum(block_bytes) + sum(data["delta_bytes"]),
                       manifest_written=manifest_written)
