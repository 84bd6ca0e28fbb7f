"""The command line: one module per group of commands, each a thin layer over a library step.

Every subcommand's arguments are the fields of one config dataclass (``dictlens.config``
turns fields into flags and their help); the library function it calls does all of the
work and writes all of the outputs; the handler here prints the summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dictlens.config import from_namespace
from dictlens.errors import DictlensError


def build_parser() -> argparse.ArgumentParser:
    from dictlens import __version__
    from dictlens.cli import analysis, data, demo, evaluate, formats, interpret, train, use

    parser = argparse.ArgumentParser(prog="dictlens", allow_abbrev=False,
                                     description="Dictionary learning on neural-network activations.")
    parser.add_argument("--version", action="version", version=f"dictlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (data, train, evaluate, analysis, interpret, use, formats, demo):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(from_namespace(args.job, args)))
    except DictlensError as e:
        print(f"dictlens {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dictlens {args.command}: interrupted; finished shards are kept: "
              "run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
