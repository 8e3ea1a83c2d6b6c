"""Shared command-line plumbing: user errors become one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys

from .errors import FeatstackError


def run_main(func, *args, **kwargs):
    try:
        return func(*args, **kwargs)
    except FeatstackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: what was finished is kept; rerun to complete", file=sys.stderr)
        sys.exit(130)


def parse_command(parser, argv=None):
    """Every command's parsing: its options plus the shared --verbose, then quiet library output unless it is given."""
    parser.add_argument("--verbose", action="store_true",
                        help="also show the TensorFlow/JAX/absl start-up logs, CUDA probing, retracing warnings and "
                             "Keras's download lines (hidden by default)")
    args = parser.parse_args(argv)
    from .quiet import configure
    configure(verbose=args.verbose)
    return args


def usage(*forms: str) -> str:
    """argparse's ``usage``: one line per way to call a command, its required options bare, the rest as [options]
    (argparse's own line brackets every option, required or not)."""
    return "\n       ".join(f"%(prog)s {form}" for form in forms)


def comma_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def batch_size_arg(text: str):
    """argparse type of --batch-size: a positive whole number or 'auto'."""
    import argparse
    if text == "auto":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: give a positive whole number or auto")
