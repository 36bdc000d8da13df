"""The team instance: `lab` against Dagster on a real PostgreSQL, compute logs in GCS.

Two laptops (two `$DAGSTER_HOME`s holding `dagster.team.example.yaml`, unchanged) run
`lab sweep` at the same moment against one Postgres server and one storage root: the
runs are recorded in Postgres, each adapter is trained by exactly one run (the sweeps'
planning is serialised by a Postgres advisory lock, across machines), each step's
output lands in the GCS emulator, and the Postgres password the lab was given appears
in no run, tag, event or log.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from dagster import DagsterInstance, DagsterRunStatus

from lab_assets_tests.conftest import adapter_trainings, lab_process_env, patched_env
from lab_assets_tests.fakes.gcs_emulator import Emulator
from lab_assets_tests.postgres_server import REPO_ROOT, psql

pytest_plugins = ["lab_assets_tests.postgres_server"]
BUCKET = "team-logs"


@pytest.fixture(scope="module")
def emulator():
    with Emulator() as emu:
        emu.create_bucket(BUCKET)
        yield emu


def test_two_laptops_sweep_one_postgres_instance_without_duplicates(postgres, emulator, tmp_path):
    env = {
        **lab_process_env(tmp_path),
        **postgres,
        "LAB_GCS_BUCKET": BUCKET,
        "STORAGE_EMULATOR_HOST": emulator.url,
    }
    homes = []
    for name in ("laptop-a", "laptop-b"):
        home = tmp_path / name
        home.mkdir()
        shutil.copy(REPO_ROOT / "dagster.team.example.yaml", home / "dagster.yaml")
        homes.append(home)
    cmd = [sys.executable, "-m", "lab_assets.cli", "sweep"]
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "DAGSTER_HOME": str(home)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for home in homes
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    assert sum("nothing else to launch" in o for o in outs) == 1, outs
    # `lab` never rewrites a dagster.yaml it did not write
    for home in homes:
        assert (home / "dagster.yaml").read_text() == (
            REPO_ROOT / "dagster.team.example.yaml"
        ).read_text()

    with (
        patched_env(
            {
                **postgres,
                "DAGSTER_HOME": str(homes[0]),
                "LAB_GCS_BUCKET": BUCKET,
                "STORAGE_EMULATOR_HOST": emulator.url,
            }
        ),
        DagsterInstance.get() as instance,
    ):
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        runs = instance.get_runs()
        assert runs and all(r.status == DagsterRunStatus.SUCCESS for r in runs)
        assert len(instance.get_backfills()) == 1
    trained = adapter_trainings(runs)
    assert len(trained) == 8 and set(trained.values()) == {1}, trained
    assert int(psql(postgres, "SELECT count(*) FROM runs")) == len(runs)  # in Postgres itself

    # Each step's stdout/stderr went to the bucket.
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": emulator.url},
    )
    logs = [b for b in client.list_blobs(BUCKET, prefix="lab/dagster/compute-logs/")]
    adapter_run = next(r for r in runs if r.tags.get("dagster/partition", "").count("|"))
    assert any(adapter_run.run_id in b.name for b in logs), [b.name for b in logs][:10]

    # The password is nowhere the lab writes: runs, tags, events, compute logs, output.
    password = postgres["DAGSTER_PG_PASSWORD"]
    like = password.replace("'", "''")
    assert psql(postgres, f"SELECT count(*) FROM event_logs WHERE event LIKE '%{like}%'") == "0"
    assert psql(postgres, f"SELECT count(*) FROM run_tags WHERE value LIKE '%{like}%'") == "0"
    assert psql(postgres, f"SELECT count(*) FROM runs WHERE run_body LIKE '%{like}%'") == "0"
    assert all(password.encode() not in b.download_as_bytes() for b in logs)
    assert all(password not in o for o in outs)
