"""Shared fixtures: a temporary Dagster instance, storage root and scratch root per test."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance

TESTS_DIR = Path(__file__).resolve().parent
SMALL_EXPERIMENT = TESTS_DIR / "experiments" / "small.yaml"


@pytest.fixture(scope="session", autouse=True)
def warm_servers_of_this_session():
    """Warm worker servers started by this session's runs live in a directory of its own,
    and are stopped when the session ends: no test leaves one behind, none uses a
    developer's."""
    from resources.compute.local.warm_server import stop_servers
    from resources.remote.protocol import WARM_SOCKET_DIR_ENV

    directory = Path(tempfile.mkdtemp(prefix="lw-s-", dir="/tmp"))  # short: socket paths
    try:
        with patched_env({WARM_SOCKET_DIR_ENV: str(directory)}):
            yield directory
    finally:
        stop_servers(directory)
        shutil.rmtree(directory, ignore_errors=True)


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
    """The small experiment materialised once by `lab materialize`, for every test that reads it.

    Exactly the researcher's command, in a subprocess: one backfill, run by a daemon
    that `lab` starts, through Dagster's run queue. Tests that change things copy it
    first (`lab_copy`)."""
    from lab_assets.experiment.load import load_experiment

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
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "lab_assets.cli", "materialize"],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=1200,
        )
    assert proc.returncode == 0, f"lab materialize failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return {"exp": exp, "proc": proc, "root": root, "env": env, "started": t0}


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


def lab_process_env(tmp_path: Path, experiment: Path = SMALL_EXPERIMENT) -> dict[str, str]:
    """The environment of a `lab` subprocess with its own storage, scratch and instance
    under `tmp_path` (the scratch directory is made)."""
    (tmp_path / "scratch").mkdir(exist_ok=True)
    return {
        **os.environ,
        "LAB_STORAGE_ROOT": str(tmp_path / "storage"),
        "LAB_SCRATCH_ROOT": str(tmp_path / "scratch"),
        "DAGSTER_HOME": str(tmp_path / "home"),
        "LAB_EXPERIMENT": str(experiment),
    }


def adapter_trainings(runs) -> dict[str, int]:
    """How many runs trained each adapter partition (whatever their status)."""
    from collections import Counter

    return Counter(
        r.tags["dagster/partition"]
        for r in runs
        if any(k.to_user_string() == "adapter" for k in r.asset_selection or ())
    )
