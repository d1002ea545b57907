"""The `medcritical` command: one subcommand per pipeline step, each a thin shell over the library.

Each module in COMMANDS defines `add_parser(subparsers)`; the parser's `func(args)` does the work.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from medcritical import __version__
from medcritical.errors import UserError, explain_os_error

# In the order data flows through the steps, as `medcritical --help` lists them.
COMMANDS = (
    "medcritical.cli.data",
    "medcritical.cli.distill",
    "medcritical.cli.sft",
    "medcritical.cli.evaluate",
    "medcritical.cli.selfplay",
    "medcritical.cli.pipeline",
    "medcritical.cli.plan",
    "medcritical.cli.stage",
)


# Metavars of the arguments that name a file, folder or URI (NAME=URI: the part after '=').
PATH_METAVARS = {"DIR", "FILE", "PATH", "URI", "YAML", "RUN_A", "RUN_B", "NAME=URI", "NAME=DIR"}


def checked_path(convert, metavar: str):
    """The argument type of a file, folder or URI argument: a blank path, or a malformed s3 URI
    (`s3:/bucket/x`), is refused for every command before any work (a blank --output would write into
    the current folder, `s3:/b/x` into a local folder `s3:`); then the argument's own type, if any."""

    def check(value: str):
        from medcritical.core.section import check_uri

        try:
            check_uri(value.partition("=")[2] if "=" in metavar else value, "a path")  # NAME=URI: the URI
        except ValueError as e:
            message = str(e)
            raise argparse.ArgumentTypeError(
                message if message.startswith(value) and value else f"{value!r} {message}"
            ) from None
        return convert(value) if convert is not None else value

    check.__name__ = getattr(convert, "__name__", "path")
    return check


def user_error(error: BaseException, output: str | None = None) -> UserError | None:
    """The error as the user's to fix (printed as one sentence, exit 2), or None: a bug (traceback, exit 1).

    Only the project's own `UserError`s qualify, and the operating system's word that an output
    cannot be written (disk full, read-only, permission denied), which can happen wherever the disk is
    written. A ValueError or FileNotFoundError from anywhere else is unexpected."""
    if isinstance(error, UserError):
        return error
    return explain_os_error(error, output)


def is_user_error(error: BaseException) -> bool:
    return user_error(error) is not None


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
    for command in subparsers.choices.values():
        for action in command._actions:  # arguments that name a file, folder or URI: checked alike
            if action.metavar in PATH_METAVARS:
                action.type = checked_path(action.type, action.metavar)
        # -v after the command name too (`medcritical evaluate -v ...`); SUPPRESS keeps one given before it.
        command.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="debug logging, and the traceback of an error",
        )
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
    except Exception as e:
        shown = user_error(e, getattr(args, "output", None))
        if shown is None:
            traceback.print_exc()
            print(
                f"medcritical {args.command}: unexpected error (a bug, or a case the project does not "
                "handle yet): please report it with the traceback above",
                file=sys.stderr,
            )
            return 1
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(shown).split("\n"))  # one line, whatever the message holds
        hint = "" if args.verbose else " (rerun with -v for the traceback)"
        print(f"medcritical {args.command}: error: {message}{hint}", file=sys.stderr)
        return 2
    return int(result or 0)
