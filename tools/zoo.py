"""Inspects and maintains the block zoo.

  python -m tools.zoo list            models: family, chain length, bytes, base model
  python -m tools.zoo show NAME       a model's config, lineage and chain (who shares each block)
  python -m tools.zoo stats           logical vs stored bytes, dedup ratio, block counts
  python -m tools.zoo verify          re-hashes every block; checks every manifest's seal, its
                                      chain against its blocks and its tokenizer path (exit 1
                                      on problems); records the models that pass as verified
  python -m tools.zoo rehash NAME...  re-seals manifests you trust (old ones have no seal, or
                                      one you edited on purpose); the chain must still pass
  python -m tools.zoo export NAME --out=DIR
                                      writes the model as a Hugging Face checkpoint (a full
                                      fine-tune's compressed deltas materialised over its base)
  python -m tools.zoo gc [--force]    removes blocks no model references (waits for conversions)
                                      and the equivalence records of removed blocks or models;
                                      keeps blocks of a model's last verified manifest unless
                                      --force
  python -m tools.zoo equiv --model=M [--block=ID_PREFIX] [--position=P] [--calibration=FILE]
                                      measures how replacing M's blocks with same-shape blocks of
                                      other models changes M; stores equivalence records
  python -m tools.zoo assemble --model=M --name=NEW [--max_kl=X] [--min_top1=Y]
                                      a new model taking equivalent blocks within the budget

All take --zoo=DIR (default checkpoints/zoo). The logic lives in jblock.zoo.
"""

import os

from absl import flags

from jblock.errors import JBlockError
from jblock.zoo import cli
from jblock.zoo.store import Zoo
from launch.console import run_script

PROG = "zoo"
COMMANDS = "list, show NAME, stats, verify, rehash NAME..., export NAME, gc, equiv, assemble"

_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Zoo directory.")
_MODEL = flags.DEFINE_string("model", None, "equiv/assemble: the model to evaluate or assemble from.")
_NAME = flags.DEFINE_string("name", None, "assemble: name of the new model.")
_MAX_KL = flags.DEFINE_float("max_kl", None, "assemble: budget, mean KL(original || assembled).")
_MIN_TOP1 = flags.DEFINE_float("min_top1", None, "assemble: budget, top-1 agreement with the original.")
_CALIBRATION = flags.DEFINE_string(
    "calibration", None, "equiv/assemble: text file (tokenized for the model) or token ids "
    "(.npy, .json); default: jblock/train/demo_corpus.txt.")
_CANDIDATES = flags.DEFINE_list(
    "candidates", None, "equiv/assemble: models whose blocks are candidates (default: the model's "
    "base_model when it is in the zoo, else every other model).")
_BLOCK = flags.DEFINE_string("block", None, "equiv: one candidate block (id or unique prefix).")
_POSITION = flags.DEFINE_integer("position", None, "equiv: only this chain position.")
_ANY_POSITION = flags.DEFINE_bool("any_position", False,
                                  "equiv/assemble: candidates from any position of the source "
                                  "models, not only the same one.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "equiv/assemble: tokens per calibration window.")
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", 64, "equiv/assemble: windows per split, at most.")
_HOLDOUT = flags.DEFINE_float("holdout", 0.25, "equiv/assemble: held-out tail of the calibration text.")
_REPORT = flags.DEFINE_string("report", None, "equiv/assemble: also write the report as JSON here.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "assemble: replace a model named --name.")
_OUT = flags.DEFINE_string("out", None, "export: the checkpoint directory to write (new or empty).")
_FORCE = flags.DEFINE_bool("force", False, "gc: also remove blocks that only the last verified "
                           "manifest of some model references.")
_PROGRESS = flags.DEFINE_bool("progress", True, "equiv/assemble: progress bars on stderr.")


def _equivalence_options() -> dict:
  return dict(calibration=_CALIBRATION.value, sources=_CANDIDATES.value,
              any_position=_ANY_POSITION.value, seq_len=_SEQ_LEN.value,
              max_windows=_MAX_WINDOWS.value, holdout=_HOLDOUT.value, progress=_PROGRESS.value)


def _equivalence(zoo: Zoo, command: str) -> list[str]:
  from jblock.bench import results
  from jblock.zoo import assemble, equiv_cli, equivalence
  if not _MODEL.value:
    cli.fail(PROG, f"'{command}' needs --model")
  if command == "equiv":
    candidates = [equiv_cli.resolve_block(zoo, _BLOCK.value)] if _BLOCK.value else None
    positions = [_POSITION.value] if _POSITION.value is not None else None
    report = equivalence.evaluate(zoo, _MODEL.value, candidates=candidates, positions=positions,
                                  **_equivalence_options())
    lines = equiv_cli.equiv_lines(report)
  else:
    if not _NAME.value:
      cli.fail(PROG, "'assemble' needs --name for the new model")
    if _MAX_KL.value is None and _MIN_TOP1.value is None:
      cli.fail(PROG, "'assemble' needs a budget: --max_kl, --min_top1 or both")
    report = assemble.assemble(zoo, _MODEL.value, _NAME.value, max_kl=_MAX_KL.value,
                               min_top1=_MIN_TOP1.value, overwrite=_OVERWRITE.value,
                               say=cli.progress_printer(), **_equivalence_options())
    lines = equiv_cli.assemble_lines(report)
  if _REPORT.value:
    results.write_json(_REPORT.value, report)
    lines.append(f"report: {_REPORT.value}")
  return lines


def run(zoo: Zoo, command: str, args: list[str]) -> int:
  if command == "rehash":
    if not args:
      cli.fail(PROG, "'rehash' takes one or more model NAMEs")
  else:
    expected = 1 if command in ("show", "export") else 0
    if len(args) != expected:
      cli.fail(PROG, f"'{command}' takes {'a model NAME' if expected else 'no arguments'}")
  if command == "list":
    lines = cli.list_lines(zoo)
  elif command == "show":
    lines = cli.show_lines(zoo, args[0])
  elif command == "stats":
    lines = cli.stats_lines(zoo, zoo.stats())
  elif command == "verify":
    problems = zoo.verify()
    for problem in problems:
      print(f"problem: {problem}")
    print(f"verified {len(zoo.block_ids())} blocks and {len(zoo.models())} models: "
          f"{len(problems)} problem{'s' if len(problems) != 1 else ''}")
    return 1 if problems else 0
  elif command == "export":
    from jblock.zoo.export import export_model
    if not _OUT.value:
      cli.fail(PROG, "'export' needs --out=DIR")
    files = export_model(zoo, args[0], _OUT.value, progress=cli.progress_printer())
    lines = [f"exported {args[0]} to {_OUT.value}: {', '.join(files)}"]
  elif command == "rehash":
    lines = cli.rehash_lines(zoo, args)
  elif command == "gc":
    lines = cli.gc_lines(zoo.gc(force=_FORCE.value))
  elif command in ("equiv", "assemble"):
    lines = _equivalence(zoo, command)
  else:
    cli.fail(PROG, f"unknown command {command!r}; commands: {COMMANDS}")
  print("\n".join(lines))
  return 0


def main(argv: list[str]) -> int:
  cli.quiet_libraries()
  if len(argv) < 2:
    cli.fail(PROG, f"a command is required: {COMMANDS}")
  if not os.path.isdir(_ZOO.value):
    cli.fail(PROG, f"--zoo={_ZOO.value}: no such directory")
  try:
    return run(Zoo(_ZOO.value), argv[1], argv[2:])
  except (JBlockError, OSError) as e:
    cli.fail(PROG, str(e), code=1)


def console() -> None:
  """The console script (pyproject's [project.scripts])."""
  run_script(main, __name__, flags_parser=cli.flags_parser(PROG))


if __name__ == "__main__":
  console()
