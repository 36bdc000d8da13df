"""Which experiment file is used: --experiment, else $LAB_EXPERIMENT, else ./experiments/tiny.yaml."""

import shutil
import subprocess
import sys

import pytest

from lab_assets.experiment.load import load_experiment, parse_experiment
from lab_assets.experiment.schema import ExperimentError
from lab_assets_tests.conftest import SMALL_EXPERIMENT, TESTS_DIR

REPO_ROOT = TESTS_DIR.parent


def test_default_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("LAB_EXPERIMENT", raising=False)
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    (tmp_path / "experiments").mkdir()
    shutil.copy(SMALL_EXPERIMENT, tmp_path / "experiments" / "tiny.yaml")
    monkeypatch.chdir(tmp_path)
    exp = load_experiment()
    # A second checkout reads its own experiment and storage, not the installed package's.
    assert exp.path == tmp_path / "experiments" / "tiny.yaml"
    assert exp.storage_root.startswith(str(tmp_path))


def test_missing_default_says_how_to_choose_one(tmp_path, monkeypatch):
    monkeypatch.delenv("LAB_EXPERIMENT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExperimentError) as e:
        load_experiment()
    msg = str(e.value)
    assert str(tmp_path / "experiments" / "tiny.yaml") in msg
    assert "--experiment" in msg and "$LAB_EXPERIMENT" in msg


def test_env_names_its_source_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_EXPERIMENT", str(tmp_path / "nope.yaml"))
    with pytest.raises(
        ExperimentError, match=r"nope.yaml: experiment file not found \(from \$LAB_EXPERIMENT\)"
    ):
        load_experiment()


def test_explicit_path_beats_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_EXPERIMENT", str(tmp_path / "nope.yaml"))
    assert load_experiment(SMALL_EXPERIMENT).path == SMALL_EXPERIMENT


def test_parsed_from_text_equals_loaded_from_file(monkeypatch):
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    loaded = load_experiment(SMALL_EXPERIMENT)
    parsed = parse_experiment(SMALL_EXPERIMENT.read_text(), SMALL_EXPERIMENT, loaded.storage_root)
    assert parsed == loaded


def test_cli_outside_a_checkout_says_how_to_choose(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "lab_assets.cli", "validate"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("lab: ")
    assert "--experiment" in proc.stderr and "Traceback" not in proc.stderr
