"""The `lab` command tree: one parser, every command with a purpose and an example."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from lab_assets.cli.main import build_parser, main
from lab_assets_tests.conftest import TESTS_DIR

COMMANDS = [
    "materialize",
    "sweep",
    "reconcile",
    "validate",
    "fetch",
    "spectrum",
    "launch",
    "vms",
    "image",
    "doctor",
    "compare",
]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _every_command(parser, path=()):
    for name, sub in _subparsers(parser).items():
        yield (*path, name), sub
        yield from _every_command(sub, (*path, name))


def test_one_tree_lists_every_command(capsys):
    assert list(_subparsers(build_parser())) == COMMANDS
    assert list(_subparsers(_subparsers(build_parser())["vms"])) == ["list", "reap"]
    assert list(_subparsers(_subparsers(build_parser())["image"])) == [
        "build",
        "teardown",
        "import",
    ]
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize(
    "path", [p for p, _ in _every_command(build_parser())], ids=lambda p: " ".join(p)
)
def test_every_help_has_a_purpose_and_an_example(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert description.strip() and "\n" not in description.strip()  # one line
    assert f"example:\n  lab {' '.join(path)}" in out


def test_materialize_help_names_the_default_experiment(capsys):
    with pytest.raises(SystemExit):
        main(["materialize", "--help"])
    assert "lab materialize --experiment experiments/tiny.yaml" in capsys.readouterr().out


def test_validate_and_a_bad_experiment(tmp_path, capsys, monkeypatch):
    # validate checks that storage is writable: a root of the test's own, not the file's
    monkeypatch.setenv("LAB_STORAGE_ROOT", str(tmp_path / "storage"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["validate", "--experiment", str(TESTS_DIR / "experiments" / "small.yaml")]) == 0
    out = capsys.readouterr().out
    assert "base models  tiny-test" in out and "runs " in out and "adapters " in out
    assert main(["validate", "--experiment", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("lab: ")


def test_module_entry_point_is_the_same_tree():
    cli = subprocess.run(
        [sys.executable, "-m", "lab_assets.cli", "--help"], capture_output=True, text=True
    )
    assert cli.returncode == 0 and "spectrum" in cli.stdout and "image" in cli.stdout
