"""Running an absl program as an installed console script (pyproject's [project.scripts]).

absl's --help lists the flags and the docstring of the program's main module. For
`python -m launch.serve` that is launch.serve; for the installed `jblock-serve` it is the small
wrapper pip writes into bin/, which defines no flag and has no docstring, so --help printed a
bare usage line. `run_script` lends the wrapper the module's docstring and flags first. absl
also exits with status 1 after printing help; asking for help is not an error, so it exits 0.
"""

import sys
from typing import Callable

from absl import app
from absl import flags

HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def run_script(main: Callable, module_name: str, **run_kwargs) -> None:
  """app.run(main) with the flags and docstring of `module_name` shown by --help."""
  program = sys.modules.get("__main__")
  module = sys.modules[module_name]
  if program is not None and program is not module:
    if not program.__doc__:
      program.__doc__ = module.__doc__
    fv = flags.FLAGS
    for flag in fv.get_key_flags_for_module(module_name) + fv.get_flags_for_module(module_name):
      fv.register_key_flag_for_module(sys.argv[0], flag)
  asked_for_help = any(a in HELP_FLAGS for a in sys.argv[1:])
  try:
    app.run(main, **run_kwargs)
  except SystemExit as e:
    if asked_for_help and e.code == 1:
      sys.exit(0)
    raise
