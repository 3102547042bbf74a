"""`python -m tui`: the same as `mlsd tui`, for a checkout where the subcommand is not registered."""

from __future__ import annotations

import argparse
import sys

from tui.cli import add_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tui")
    sub = parser.add_subparsers(dest="command")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models-dir", metavar="DIR", help="models root in the A1111 layout")
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    add_parser(sub, common)
    args = parser.parse_args(["tui", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
