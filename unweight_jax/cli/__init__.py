"""The `unweight` command line: one subcommand per module of this package.

A command is a module here (not starting with "_") that defines `register(commands)`: it adds its
parser to the argparse subparsers `commands` and sets `run=<function(args) -> exit code>` as a
default. Adding a command is adding a module; nothing here changes. Command modules import heavy
dependencies (jax, the models) inside `run`, so that every command starts fast.

Expected failures (bad paths, unreadable or corrupt files, refused operations) print one line,
`unweight <command>: error: <message naming the file, tensor or argument>`, and exit with 2 (1
where a command defines a check that can fail, as `verify` does); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from ..compress import CheckpointError
from ..format import FormatError

EXIT_USAGE = 2  # usage and input errors, as argparse itself uses


class CommandError(Exception):
    """An expected failure of a command: its message is all the user needs to see."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


EXPECTED_ERRORS = (CommandError, CheckpointError, FormatError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unweight", description="Lossless compression of bf16 model weights, and inference from them."
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}").register(commands)
    return parser


def describe(error: BaseException) -> str:
    """One line for an expected error; an OSError says which path and what went wrong."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = f"unweight {args.command}"
    try:
        return args.run(args)
    except EXPECTED_ERRORS as e:
        print(f"{command}: error: {describe(e)}", file=sys.stderr)
        return e.exit_code if isinstance(e, CommandError) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
