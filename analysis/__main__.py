"""Command line: ``python -m analysis <command>``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from analysis.leaderboard import NoRecordsError, load_leaderboard


def _leaderboard(args: argparse.Namespace) -> int:
    """Write leaderboard.{md,csv,html}; print the paths and the Markdown tables."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            board = load_leaderboard(args.results)
        except NoRecordsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    out_dir = args.out if args.out is not None else args.results
    for path in board.write(out_dir):
        print(f"wrote {path}")
    print()
    print(board.to_markdown(details=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per analysis."""
    parser = argparse.ArgumentParser(prog="python -m analysis", description="Analyse deltabench results.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    board = commands.add_parser("leaderboard", help="aggregate run records into leaderboard.{md,csv,html}")
    board.add_argument("--results", type=Path, default=Path("results"), help="results directory (default: results)")
    board.add_argument("--out", type=Path, default=None, help="output directory (default: the results directory)")
    board.set_defaults(func=_leaderboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
