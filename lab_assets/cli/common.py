"""What every `lab` command shares: how a command is added to the tree, and how it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from lab_assets.experiment.schema import ExperimentError

if TYPE_CHECKING:
    from lab_assets.experiment.resolved import Experiment

# A command module's `register(subparsers)`: adds its commands to the `lab` tree.
Register = Callable[[argparse._SubParsersAction], None]


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    *,
    purpose: str,
    examples: Sequence[str],
    fn: Callable[[argparse.Namespace], int] | None = None,
    help: str | None = None,
) -> argparse.ArgumentParser:
    """One command (or command group): its one-line purpose and examples show in its --help."""
    parser = subparsers.add_parser(
        name,
        help=help or purpose[0].lower() + purpose[1:].rstrip("."),
        description=purpose,
        epilog="example:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if fn is not None:
        parser.set_defaults(fn=fn)
    return parser


def add_experiment(
    parser: argparse.ArgumentParser,
    default: str = "$LAB_EXPERIMENT, else ./experiments/tiny.yaml",
) -> None:
    parser.add_argument("--experiment", help=f"experiment YAML (default: {default})")


def build_tree(description: str, registers: Sequence[Register]) -> argparse.ArgumentParser:
    """The `lab` parser with every command the given modules register."""
    parser = argparse.ArgumentParser(
        prog="lab",
        description=description,
        epilog="Run `lab COMMAND --help` for a command's options and an example.",
    )
    subparsers = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for register in registers:
        register(subparsers)
    return parser


class PreflightError(RuntimeError):
    """A check made before any compute failed (the storage root is not writable)."""


def check_storage(exp: Experiment) -> str:
    """The storage preflight of every command that computes: a probe is written to and
    deleted from the experiment's storage root (``resources.storage.preflight``), so an
    unwritable root stops the command before anything trains. Returns the probe's place."""
    from resources.storage.base import StorageError
    from resources.storage.preflight import check_writable

    exp.require_settings(f"writing to storage {exp.storage_root}")
    try:
        return check_writable(exp.storage_root, exp.name)
    except StorageError as e:
        raise PreflightError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; an invalid experiment or a failed preflight is
    `lab: <message>` and exit code 2."""
    try:
        return args.fn(args)
    except (ExperimentError, PreflightError) as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2
