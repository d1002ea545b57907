"""The `medcritical` command: one subcommand per pipeline step, each a thin shell over the library.

Each module in COMMANDS defines `add_parser(subparsers)`; the parser's `func(args)` does the work.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medcritical import __version__

# In the order data flows through the steps, as `medcritical --help` lists them.
COMMANDS = (
    "medcritical.cli.data",
    "medcritical.cli.distill",
    "medcritical.cli.sft",
    "medcritical.cli.evaluate",
    "medcritical.cli.selfplay",
    "medcritical.cli.pipeline",
    "medcritical.cli.plan",
)

# Errors that are the user's to fix: printed as one clear message, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medcritical",
        description=(
            "MedCritical: train medical reasoning models in two stages (teacher distillation + SFT, "
            "then self-play self-correction + DPO) and measure them on CMExam. Each subcommand is "
            "one pipeline step; `medcritical run` runs them all on one machine."
        ),
        epilog="Example: medcritical evaluate --recipe recipes/demo.yaml --output runs/eval",
    )
    parser.add_argument("--version", action="version", version=f"medcritical {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"medcritical {args.command}: error: {e}\n(rerun with -v for the traceback)", file=sys.stderr)
        return 2
    return int(result or 0)
