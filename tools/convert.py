"""Converts a Hugging Face checkpoint into the block zoo.

  python -m tools.convert --hf_dir=DIR --name=NAME [--zoo=checkpoints/zoo]
      [--layers_per_block=1] [--dtype=float32] [--overwrite] [--base=BASE_NAME]
  python -m tools.convert --peft_dir=DIR --base=BASE_NAME --name=NAME [--zoo=...] [--overwrite]

A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) becomes delta blocks over
the base model's chain (jblock.zoo.adapters); the adapter is then a model name like any other.

Blocks the zoo already holds (the frozen part of a fine-tune, say) are reused, not written
again. The logic lives in jblock.zoo; this script only reads flags and prints.
"""

import os

from absl import app, flags

from jblock.convert.hf import DTYPES
from jblock.errors import InvalidRequestError, JBlockError
from jblock.zoo import cli, manifest
from jblock.zoo.sizes import human_bytes
from jblock.zoo.store import Zoo

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
flags.mark_flags_as_required(["name"])


def main(argv: list[str]) -> None:
  cli.quiet_libraries()
  if len(argv) > 1:
    cli.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])}")
  if bool(_HF_DIR.value) == bool(_PEFT_DIR.value):
    cli.fail(PROG, "give exactly one of --hf_dir and --peft_dir")
  if _PEFT_DIR.value:
    _convert_peft()
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


def console() -> None:
  """The console script (pyproject's [project.scripts])."""
  app.run(main, flags_parser=cli.flags_parser(PROG))


if __name__ == "__main__":
  console()
