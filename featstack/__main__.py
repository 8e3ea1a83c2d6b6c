"""`python -m featstack` and the `featstack` console script: one subcommand per stage."""
from __future__ import annotations

import importlib
import shutil
import sys
import textwrap

from .commands import COMMANDS

EXAMPLES = """examples:
  featstack extract --demo                                  # the embedded digits competition, end to end:
  featstack stack --features features/demo --model stack
  featstack submit
  featstack predict data/demo/test/014818baa17d4a315bf0675bc48263b8.jpg
  featstack extract --data data/dog-breed                   # a real competition
  featstack help stack                                      # one command's options (= featstack stack --help)
"""


def help_text() -> str:
    """The overview: every subcommand with its one-line purpose (each command's own description), then examples."""
    width = max(60, min(120, shutil.get_terminal_size().columns)) - 2
    pad = max(map(len, COMMANDS)) + 4
    lines = ["usage: featstack COMMAND [options]", "       featstack help [COMMAND]", "",
             "Frozen ImageNet CNNs -> cached features -> honest stacked models -> an exact Kaggle submission.", "",
             "commands:"]
    for name, module in COMMANDS.items():
        purpose = importlib.import_module(module).DESCRIPTION  # argparse-only modules: no TensorFlow is loaded
        lines += textwrap.wrap(purpose, width, initial_indent=f"  {name:<{pad - 2}}", subsequent_indent=" " * pad)
    lines += ["", "options:", "  -h, --help     this overview", "  -V, --version  the installed version", "",
              EXAMPLES.rstrip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(help_text(), file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help") or argv == ["help"]:
        print(help_text())
        sys.exit(0)
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"featstack {__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name == "help":  # `featstack help stack` is `featstack stack --help`
        name, rest = rest[0], ["--help"]
    if name not in COMMANDS:
        print(f"featstack: unknown command {name!r}; choose one of {', '.join(COMMANDS)} (featstack --help lists "
              "them)", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(COMMANDS[name]).main(rest, prog=f"featstack {name}")


if __name__ == "__main__":
    main()
