"""Every experiment file the repo ships loads as Dagster definitions, every job resolves.

The experiment files are globbed, so a new one is covered without editing this test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from lab_assets.definitions import build_definitions
from lab_assets.experiment.load import load_experiment
from lab_assets.names import (
    ADAPTER,
    ADAPTERS_JOB,
    BASE_MODEL,
    BASE_MODELS_JOB,
    BASE_SPECTRUM,
    CLASSIFICATION,
    CLASSIFICATION_JOB,
    SPECTRAL_FEATURES,
)

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(
    [*REPO.glob("experiments/*.yaml"), *REPO.glob("lab_assets_tests/experiments/*.yaml")]
)
ASSETS = {BASE_MODEL, BASE_SPECTRUM, ADAPTER, SPECTRAL_FEATURES, CLASSIFICATION}
ASSET_JOBS = {BASE_MODELS_JOB, ADAPTERS_JOB, CLASSIFICATION_JOB}


def test_the_repo_ships_experiments():
    assert REPO / "experiments" / "tiny.yaml" in EXPERIMENTS


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_experiment_loads_as_definitions(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_STORAGE_ROOT", str(tmp_path / "storage"))
    monkeypatch.setenv("LAB_SCRATCH_ROOT", str(tmp_path / "scratch"))
    defs = build_definitions(load_experiment(path))
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    jobs = {job.name for job in repo.get_all_jobs()}  # resolves every job
    assert ASSET_JOBS <= jobs
    keys = {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()}
    assert ASSETS <= keys
    assert not list(tmp_path.glob("storage/**/manifest.json"))  # loading writes nothing


def test_dagster_cli_validates_the_default_code_location(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "LAB_STORAGE_ROOT": str(tmp_path / "storage"),
        "LAB_SCRATCH_ROOT": str(tmp_path / "scratch"),
    }
    env.pop("LAB_EXPERIMENT", None)  # the default: ./experiments/tiny.yaml
    dagster = Path(sys.executable).with_name("dagster")  # .venv/bin/dagster
    result = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "lab_assets.definitions"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lab_assets.definitions" in result.stdout + result.stderr


def test_a_job_rebuilt_from_the_experiment_text_is_quiet(tmp_path, monkeypatch):
    """What every lab-driven run and its workers do: no warning on the user's terminal."""
    import warnings

    from lab_assets.definitions import experiment_job

    monkeypatch.setenv("LAB_STORAGE_ROOT", str(tmp_path / "storage"))
    exp = load_experiment(REPO / "experiments" / "tiny.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        job = experiment_job(exp.text, str(exp.path), exp.storage_root, ADAPTERS_JOB)
    assert job.name == ADAPTERS_JOB
