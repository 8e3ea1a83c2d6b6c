"""`python -m featstack` and the `featstack` console script: one subcommand per stage."""
from __future__ import annotations

import importlib
import sys

from .commands import COMMANDS


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: featstack {{{','.join(COMMANDS)}}} [options]   (featstack COMMAND --help for its options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"featstack {__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"featstack: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(COMMANDS[name]).main(rest, prog=f"featstack {name}")


if __name__ == "__main__":
    main()
