"""Dagster materialises real partitions into a gs:// root and reads them back downstream.

A small torch-free graph (partitioned weights -> partitioned stats -> fan-in summary)
runs in-process through the lab's own `ArtifactIOManager`, whose `LabStorage` root is
`gs://bucket/prefix` on the emulator (found through `STORAGE_EMULATOR_HOST`, as in
production code; nothing is injected).
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from dagster import (
    AssetExecutionContext,
    DagsterInstance,
    Output,
    StaticPartitionsDefinition,
    asset,
    materialize,
)
from safetensors.numpy import load_file, save_file

from lab_assets_tests.fakes.gcs_emulator import Emulator
from resources.io_manager import ArtifactIOManager, LabStorage
from resources.storage.base import MANIFEST_NAME
from resources.storage.open import open_store

REPO_ROOT = Path(__file__).resolve().parents[3]
BUCKET = "pipeline-test"
EXPERIMENT = "pipe"
parts = StaticPartitionsDefinition(["m1", "m2"])


def _out() -> Path:
    # The IO manager deletes an output directory once it is committed.
    return Path(tempfile.mkdtemp(prefix="asset-out-"))


@asset(partitions_def=parts)
def weights(context: AssetExecutionContext):
    seed = int(context.partition_key[1:])
    out = _out()
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((64, 32)).astype(np.float32)}, str(out / "w.safetensors"))
    (out / "config.json").write_text(json.dumps({"seed": seed}))
    return Output(out, metadata={"lab/seed": seed})


@asset(partitions_def=parts)
def stats(context: AssetExecutionContext, weights: Path) -> Path:
    w = load_file(str(weights / "w.safetensors"))["w"]
    out = _out()
    s = np.linalg.svd(w, compute_uv=False)
    (out / "stats.json").write_text(
        json.dumps({"partition": context.partition_key, "top_sv": float(s[0])})
    )
    return out


@asset
def summary(stats: dict[str, Path]) -> Path:
    out = _out()
    rows = {k: json.loads((p / "stats.json").read_text()) for k, p in sorted(stats.items())}
    (out / "summary.json").write_text(json.dumps(rows))
    return out


@pytest.fixture(scope="module")
def emulator():
    with Emulator() as emu:
        emu.create_bucket(BUCKET)
        yield emu


def test_partitions_round_trip_through_gcs(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    root = f"gs://{BUCKET}/lab"
    resources = {
        "io_manager": ArtifactIOManager(storage=LabStorage(root=root, experiment=EXPERIMENT))
    }

    for key in parts.get_partition_keys():
        result = materialize([weights, stats], partition_key=key, resources=resources)
        assert result.success
        mats = result.asset_materializations_for_node("weights")
        assert mats[0].metadata["storage_uri"].value == f"{root}/{EXPERIMENT}/weights/{key}"
        assert mats[0].metadata["storage_console"].value == (
            f"https://console.cloud.google.com/storage/browser/{BUCKET}/lab/{EXPERIMENT}/weights/{key}"
        )
    result = materialize([weights, stats, summary], selection=[summary], resources=resources)
    assert result.success

    # The bucket holds the on-disk layout, manifest last, and a fresh reader sees it all.
    store = open_store(root, EXPERIMENT)
    assert store.list_partitions("weights") == ["m1", "m2"]
    assert store.list_partitions("stats") == ["m1", "m2"]
    assert store.list_partitions("summary") == ["all"]
    m = store.read_manifest("weights", "m2")
    assert {f.path for f in m.files} == {"config.json", "w.safetensors"}
    assert m.metadata == {"seed": 2}
    for asset_name, key in (("weights", "m1"), ("stats", "m2"), ("summary", None)):
        assert store.verify(asset_name, key) == []
    names = {b.name for b in store.session.client.list_blobs(BUCKET, prefix=f"lab/{EXPERIMENT}/")}
    assert f"lab/{EXPERIMENT}/stats/m1/{MANIFEST_NAME}" in names

    summary_dir = store.local_path("summary", None)
    rows = json.loads((summary_dir / "summary.json").read_text())
    assert sorted(rows) == ["m1", "m2"]
    w = load_file(str(store.local_path("weights", "m1") / "w.safetensors"))["w"]
    assert rows["m1"]["top_sv"] == pytest.approx(float(np.linalg.svd(w, compute_uv=False)[0]))


def test_rematerialising_replaces_the_partition(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    root = f"gs://{BUCKET}/{tmp_path.name}"
    storage = LabStorage(root=root, experiment=EXPERIMENT)
    resources = {"io_manager": ArtifactIOManager(storage=storage)}
    assert materialize([weights], partition_key="m1", resources=resources).success
    store = open_store(root, EXPERIMENT)
    first = store.snapshot("weights", "m1")
    assert materialize([weights], partition_key="m1", resources=resources).success
    second = store.snapshot("weights", "m1")
    assert second.commit != first.commit and second.generation != first.generation
    listed = {b.name for b in store.session.client.list_blobs(BUCKET, prefix=f"{tmp_path.name}/")}
    assert not any(first.commit in n for n in listed), "the replaced commit was cleaned up"
    assert len(listed) == 3  # manifest + two files


def _overwrite(store, asset_name: str, key: str, filename: str, edit) -> None:
    """Replace one stored object outside the lab, as a careless `gsutil cp` would."""
    [obj] = [o for o in store.list_objects(f"{asset_name}/{key}") if o.path.endswith(filename)]
    blob = store.session.bucket(store.bucket).blob(f"{store._base}/{asset_name}/{key}/{obj.path}")
    blob.upload_from_string(edit(blob.download_as_bytes()))


@pytest.mark.parametrize(
    ("fault", "edit"),
    [
        ("flipped byte", lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:]),
        ("truncation", lambda b: b[:100]),
    ],
)
def test_a_corrupted_gcs_input_is_refused_found_by_the_check_and_rebuilt(
    emulator, tmp_path, monkeypatch, fault, edit
):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    root = f"gs://{BUCKET}/{tmp_path.name}"
    resources = {
        "io_manager": ArtifactIOManager(storage=LabStorage(root=root, experiment=EXPERIMENT))
    }
    assert materialize([weights], partition_key="m1", resources=resources).success
    store = open_store(root, EXPERIMENT)
    _overwrite(store, "weights", "m1", "w.safetensors", edit)

    # Refused on read: the downstream step fails with an integrity error, not a parser's.
    result = materialize(
        [weights, stats],
        selection=[stats],
        partition_key="m1",
        resources=resources,
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    text = failure.step_failure_data.error.to_string()
    assert "IntegrityError" in text and "weights[m1]" in text and "w.safetensors" in text
    assert "overwritten or deleted outside the lab" in text

    # Found by the stored-data check (what `lab sweep` and the asset check run), cheaply.
    [problem] = store.check("weights", "m1")
    assert (problem.path, problem.kind) == ("w.safetensors", "generation")
    # A stray object in the partition is reported too.
    snap = store.snapshot("weights", "m1")
    stray = f"{store._base}/weights/m1/{snap.commit}/notes.txt"
    store.session.bucket(store.bucket).blob(stray).upload_from_string(b"by hand")
    assert {(p.path, p.kind) for p in store.check("weights", "m1")} == {
        ("w.safetensors", "generation"),
        ("notes.txt", "stray"),
    }

    # Rebuilt: a new commit of the partition, and the downstream step reads it.
    assert materialize([weights], partition_key="m1", resources=resources).success
    assert store.check("weights", "m1") == []
    assert materialize(
        [weights, stats], selection=[stats], partition_key="m1", resources=resources
    ).success


@asset
def chatty(context) -> None:
    print("hello from the step's stdout")


def test_the_example_instance_config_keeps_compute_logs_in_gcs(emulator, tmp_path, monkeypatch):
    """`dagster.gcs.example.yaml` loads as is and puts step stdout/stderr in the bucket."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.setenv("LAB_GCS_BUCKET", BUCKET)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.gcs.example.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        assert type(instance.compute_log_manager).__name__ == "GCSComputeLogManager"
        result = materialize([chatty], instance=instance)
        assert result.success
    client = open_store(f"gs://{BUCKET}/x", "x").session.client
    logs = [
        b
        for b in client.list_blobs(BUCKET, prefix="lab/dagster/compute-logs/")
        if result.run_id in b.name
    ]
    assert any(b.name.endswith(".out") for b in logs)
    out = next(b for b in logs if b.name.endswith(".out")).download_as_text()
    assert "hello from the step's stdout" in out
