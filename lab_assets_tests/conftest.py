"""Shared fixtures: a temporary Dagster instance, storage root and scratch root per test."""

import contextlib
import os
from pathlib import Path

import pytest
from dagster import DagsterInstance

TESTS_DIR = Path(__file__).resolve().parent
SMALL_EXPERIMENT = TESTS_DIR / "experiments" / "small.yaml"


@pytest.fixture
def lab_env(tmp_path, monkeypatch):
    """Isolated storage, scratch root and DAGSTER_HOME; yields the paths."""
    env = {
        "storage": tmp_path / "storage",
        "scratch": tmp_path / "scratch",
        "home": tmp_path / "dagster_home",
    }
    for p in env.values():
        p.mkdir()
    monkeypatch.setenv("LAB_STORAGE_ROOT", str(env["storage"]))
    monkeypatch.setenv("LAB_SCRATCH_ROOT", str(env["scratch"]))
    monkeypatch.setenv("DAGSTER_HOME", str(env["home"]))
    return env


@pytest.fixture
def instance(lab_env):
    with DagsterInstance.local_temp(str(lab_env["home"])) as inst:
        yield inst


@pytest.fixture(scope="session")
def small_lab(tmp_path_factory):
    """The small experiment materialised once, through Dagster, for every test that reads it.

    Tests that change things copy it first (`copy_lab`)."""
    from lab_assets.experiment.load import load_experiment
    from lab_assets.orchestration.runner import materialize_experiment

    root = tmp_path_factory.mktemp("small_lab")
    env = {
        "LAB_STORAGE_ROOT": str(root / "storage"),
        "LAB_SCRATCH_ROOT": str(root / "scratch"),
        "DAGSTER_HOME": str(root / "home"),
        "LAB_EXPERIMENT": str(SMALL_EXPERIMENT),
    }
    with patched_env(env):
        for k in ("LAB_SCRATCH_ROOT", "DAGSTER_HOME"):
            os.makedirs(env[k])
        exp = load_experiment()
        with DagsterInstance.get() as instance:
            summary = materialize_experiment(exp, instance)
    return {"exp": exp, "summary": summary, "root": root, "env": env}


@contextlib.contextmanager
def patched_env(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def scratch_leftovers(root: Path) -> list[str]:
    return sorted(os.listdir(root))
