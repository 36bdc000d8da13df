"""Shared fixtures: a temporary Dagster instance, storage root and scratch root per test."""

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


def scratch_leftovers(root: Path) -> list[str]:
    return sorted(os.listdir(root))
