"""Converts a Hugging Face checkpoint into the block zoo.

  python -m tools.convert --hf_dir=DIR --name=NAME [--zoo=checkpoints/zoo]
      [--layers_per_block=1] [--dtype=float32] [--overwrite] [--base=BASE_NAME]
  python -m tools.convert --peft_dir=DIR --base=BASE_NAME --name=NAME [--zoo=...] [--overwrite]
  python -m tools.convert --hf_dir=FT --name=NAME --delta_base=BASE
      [--delta=auto|bitdelta|int4|int8|none] [--calibration=FILE] [--delta_max_kl=0.005]
      [--delta_min_top1=0.99] [--distill_steps=200]

A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) becomes delta blocks over
the base model's chain (jblock.zoo.adapters); the adapter is then a model name like any other.
With --delta_base, a full fine-tune of a zoo model is stored as compressed delta blocks over
that model's chain (jblock.zoo.full_deltas) and served through the base's instances.

Blocks the zoo already holds (the frozen part of a fine-tune, say) are reused, not written
again. The logic lives in jblock.zoo; this script only reads flags and prints.
"""

import os

from absl import flags

from jblock.convert.hf import DTYPES
from jblock.errors import InvalidRequestError, JBlockError
from jblock.zoo import cli, manifest
from jblock.zoo.sizes import human_bytes
from jblock.zoo.full_deltas import ENCODINGS, DeltaOptions, convert_full_delta
from jblock.zoo.store import Zoo
from launch.console import run_script

PROG = "convert"

_HF_DIR = flags.DEFINE_string("hf_dir", None,
                              "Hugging Face checkpoint directory (config.json + safetensors).")
_PEFT_DIR = flags.DEFINE_string("peft_dir", None, "PEFT LoRA adapter directory "
                                "(adapter_config.json + adapter_model.safetensors); needs --base.")
_NAME = flags.DEFINE_string("name", None,
                            "Model name in the zoo (letters, digits, '.', '_', '-').")
_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Zoo directory (created when missing).")
_LAYERS_PER_BLOCK = flags.DEFINE_integer("layers_per_block", 1,
                                         "Decoder layers per layers block.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Parameter dtype stored in the zoo.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace a model of this name even if its chain differs.")
_BASE = flags.DEFINE_string("base", None, "Zoo name of the model this one was fine-tuned from "
                            "(recorded as lineage; default: the HF dir's lineage.json, if any).")
_DELTA_BASE = flags.DEFINE_string("delta_base", None, "Zoo name of the base model a full fine-tune "
                                  "(--hf_dir) is stored against as compressed delta blocks.")
_DELTA = flags.DEFINE_enum("delta", "auto", list(ENCODINGS), "With --delta_base: the delta "
                           "encoding; auto picks per block the smallest within the bounds.")
_CALIBRATION = flags.DEFINE_string("calibration", None, "With --delta_base: calibration text "
                                   "(or .npy/.json token ids); default: the demo corpus.")
_MAX_KL = flags.DEFINE_float("delta_max_kl", DeltaOptions.max_kl, "auto's bound: mean "
                             "KL(fine-tune || served) on the calibration windows.", lower_bound=0)
_MIN_TOP1 = flags.DEFINE_float("delta_min_top1", DeltaOptions.min_top1, "auto's bound: top-1 "
                               "agreement with the fine-tune.", lower_bound=0, upper_bound=1)
_DISTILL = flags.DEFINE_integer("distill_steps", DeltaOptions.distill_steps, "bitdelta: "
                                "scale distillation steps (0: none).", lower_bound=0)
flags.mark_flags_as_required(["name"])


def main(argv: list[str]) -> None:
  cli.quiet_libraries()
  if len(argv) > 1:
    cli.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])}")
  if bool(_HF_DIR.value) == bool(_PEFT_DIR.value):
    cli.fail(PROG, "give exactly one of --hf_dir and --peft_dir")
  if _PEFT_DIR.value and _DELTA_BASE.value:
    cli.fail(PROG, "--delta_base takes a full fine-tune's --hf_dir, not --peft_dir")
  if _PEFT_DIR.value:
    _convert_peft()
    return
  if _DELTA_BASE.value:
    _convert_full_delta()
    return
  if not os.path.isdir(_HF_DIR.value):
    cli.fail(PROG, f"--hf_dir={_HF_DIR.value}: no such directory")
  try:
    manifest.check_name(_NAME.value)
  except InvalidRequestError as e:
    cli.fail(PROG, f"--{e}")
  lineage = None
  if _BASE.value:
    lineage = {**(manifest.source_lineage(_HF_DIR.value) or {}), "base_model": _BASE.value}
  zoo = Zoo(_ZOO.value)
  try:
    report = zoo.convert(_HF_DIR.value, _NAME.value, dtype=_DTYPE.value,
                         layers_per_block=_LAYERS_PER_BLOCK.value, overwrite=_OVERWRITE.value,
                         lineage=lineage, progress=cli.progress_printer())
  except (JBlockError, OSError) as e:
    cli.fail(PROG, str(e), code=1)
  print("\n".join(cli.convert_lines(zoo, report)))


def _convert_peft() -> None:
  if not _BASE.value:
    cli.fail(PROG, "--peft_dir needs --base (the zoo name of the adapter's base model)")
  if not os.path.isdir(_PEFT_DIR.value):
    cli.fail(PROG, f"--peft_dir={_PEFT_DIR.value}: no such directory")
  try:
    manifest.check_name(_NAME.value)
  except InvalidRequestError as e:
    cli.fail(PROG, f"--{e}")
  zoo = Zoo(_ZOO.value)
  try:
    report = zoo.convert_peft(_PEFT_DIR.value, _BASE.value, _NAME.value,
                              overwrite=_OVERWRITE.value, progress=cli.progress_printer())
  except (JBlockError, OSError) as e:
    cli.fail(PROG, str(e), code=1)
  print("\n".join(cli.convert_lines(zoo, report)))
  deltas = [d for d in zoo.manifest(_NAME.value)["deltas"] if d]
  print(f"  adapter over {_BASE.value}: {len(deltas)} delta blocks "
        f"({human_bytes(sum(zoo.block_record(d)['nbytes'] for d in deltas))})")


def _convert_full_delta() -> None:
  if not os.path.isdir(_HF_DIR.value):
    cli.fail(PROG, f"--hf_dir={_HF_DIR.value}: no such directory")
  if _CALIBRATION.value and not os.path.isfile(_CALIBRATION.value):
    cli.fail(PROG, f"--calibration={_CALIBRATION.value}: no such file")
  try:
    manifest.check_name(_NAME.value)
  except InvalidRequestError as e:
    cli.fail(PROG, f"--{e}")
  zoo = Zoo(_ZOO.value)
  opts = DeltaOptions(method=_DELTA.value, calibration=_CALIBRATION.value, max_kl=_MAX_KL.value,
                      min_top1=_MIN_TOP1.value, distill_steps=_DISTILL.value)
  try:
    report = convert_full_delta(zoo, _HF_DIR.value, _DELTA_BASE.value, _NAME.value, opts,
                                overwrite=_OVERWRITE.value, progress=cli.progress_printer())
  except (JBlockError, OSError) as e:
    cli.fail(PROG, str(e), code=1)
  print("\n".join(cli.convert_lines(zoo, report)))
  m = zoo.manifest(_NAME.value)
  record = m["full_delta"]
  print(f"  full fine-tune over {_DELTA_BASE.value}: {sum(1 for d in m['deltas'] if d)} "
        f"compressed delta blocks ({human_bytes(sum(m['delta_bytes']))}); encodings "
        + ", ".join(f"{p}={e}" for p, e in record["encodings"].items()))
  for split, loss in record["losses"].items():
    print(f"  {split}: KL(fine-tune || served) {loss['kl']:.5f}, top-1 {loss['top1']:.4f}")


def console() -> None:
  """The console script (pyproject's [project.scripts])."""
  run_script(main, __name__, flags_parser=cli.flags_parser(PROG))


if __name__ == "__main__":
  console()
