"""Converts a Hugging Face checkpoint into the block zoo.

  python -m tools.convert --hf_dir=DIR --name=NAME [--zoo=checkpoints/zoo]
      [--layers_per_block=1] [--dtype=float32] [--overwrite] [--base=BASE_NAME]

Blocks the zoo already holds (the frozen part of a fine-tune, say) are reused, not written
again. The logic lives in jblock.zoo; this script only reads flags and prints.
"""

import os

from absl import app, flags

from jblock.convert.hf import DTYPES
from jblock.errors import InvalidRequestError, JBlockError
from jblock.zoo import cli, manifest
from jblock.zoo.store import Zoo

PROG = "convert"

_HF_DIR = flags.DEFINE_string("hf_dir", None,
                              "Hugging Face checkpoint directory (config.json + safetensors).")
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
flags.mark_flags_as_required(["hf_dir", "name"])


def main(argv: list[str]) -> None:
  cli.quiet_libraries()
  if len(argv) > 1:
    cli.fail(PROG, f"unexpected arguments: {' '.join(argv[1:])}")
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


def console() -> None:
  """The console script (pyproject's [project.scripts])."""
  app.run(main, flags_parser=cli.flags_parser(PROG))


if __name__ == "__main__":
  console()
