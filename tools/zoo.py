"""Inspects and maintains the block zoo.

  python -m tools.zoo list            models: family, chain length, bytes, base model
  python -m tools.zoo show NAME       a model's config, lineage and chain (who shares each block)
  python -m tools.zoo stats           logical vs stored bytes, dedup ratio, block counts
  python -m tools.zoo verify          re-hashes every block, checks manifests (exit 1 on problems)
  python -m tools.zoo gc              removes blocks no model references (waits for conversions)

All take --zoo=DIR (default checkpoints/zoo). The logic lives in jblock.zoo.
"""

import os

from absl import app, flags

from jblock.errors import JBlockError
from jblock.zoo import cli
from jblock.zoo.store import Zoo

PROG = "zoo"
COMMANDS = "list, show NAME, stats, verify, gc"

_ZOO = flags.DEFINE_string("zoo", "checkpoints/zoo", "Zoo directory.")


def run(zoo: Zoo, command: str, args: list[str]) -> int:
  expected = 1 if command == "show" else 0
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
  elif command == "gc":
    lines = cli.gc_lines(zoo.gc())
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


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROG))
