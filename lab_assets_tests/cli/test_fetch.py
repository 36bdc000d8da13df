"""`lab fetch`: results synced from a gs:// root (on the emulator) or a local root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab_assets.cli.main import main
from lab_assets_tests.conftest import SMALL_EXPERIMENT
from lab_assets_tests.fakes.gcs_emulator import Emulator
from resources.storage.base import MANIFEST_NAME, partition_dirname
from resources.storage.open import open_store

BUCKET = "fetch-test"
EXPERIMENT = "small"  # the name in SMALL_EXPERIMENT

PARTITIONS = {
    ("spectral_features", "tiny-test|sft-arith-r4-s0"): {"features.parquet": b"A" * 5000},
    ("spectral_features", "tiny-test|dpo-arith-r4-s0"): {"features.parquet": b"B" * 7000},
    ("classification_results", None): {
        "results.json": b'{"method": {"accuracy": 1.0}}',
        "plots/classification.png": b"\x89PNG fake",
    },
    ("adapter", "tiny-test|sft-arith-r4-s0"): {
        "adapter_model.safetensors": os.urandom(20_000),
        "adapter_config.json": b"{}",
    },
}
# Raw files, no manifest: what the GCE launcher streams, beside files lab fetch leaves alone.
LAUNCH = "_launches/run-9f2/adapter/attempts/1"
RAW_FILES = {
    f"{LAUNCH}/logs/00000000.txt": b"step 1 loss 2.0\n",
    f"{LAUNCH}/logs/00000001.txt": b"step 2 loss 1.9\n",
    f"{LAUNCH}/events/00000000.jsonl": b"{}\n",
    "_launches/run-9f2/adapter/bundle/lab-0.1.0-py3-none-any.whl": b"PK wheel",
    "logs/orchestrator.log": b"started\n",
}
LOG_FILES = {
    "run-9f2/adapter/attempts/1/logs/00000000.txt": b"step 1 loss 2.0\n",
    "run-9f2/adapter/attempts/1/logs/00000001.txt": b"step 2 loss 1.9\n",
    "orchestrator.log": b"started\n",
}


@pytest.fixture(scope="module")
def emulator():
    with Emulator() as emu:
        emu.create_bucket(BUCKET)
        yield emu


def _populate(root: str, tmp: Path) -> None:
    store = open_store(root, EXPERIMENT)
    for (asset, key), files in PARTITIONS.items():
        src = tmp / "src" / asset / (key or "all")
        for rel, data in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        store.commit(asset, key, src)
    if root.startswith("gs://"):
        bucket = store.session.client.bucket(BUCKET)
        for rel, data in RAW_FILES.items():
            bucket.blob(f"{store._base}/{rel}").upload_from_string(data)
    else:
        for rel, data in RAW_FILES.items():
            p = Path(root) / EXPERIMENT / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


@pytest.fixture(params=["gcs", "local"])
def root(request, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    if request.param == "gcs":
        emu = request.getfixturevalue("emulator")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
        r = f"gs://{BUCKET}/{tmp_path.name}"
    else:
        r = str(tmp_path / "storage")
    monkeypatch.setenv("LAB_STORAGE_ROOT", r)
    monkeypatch.setenv("LAB_EXPERIMENT", str(SMALL_EXPERIMENT))
    _populate(r, tmp_path)
    return r


def tree(d: Path) -> dict[str, bytes]:
    return {
        p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
    }


def expected_results(include_adapters: bool = False) -> dict[str, bytes]:
    out = {}
    for (asset, key), files in PARTITIONS.items():
        if asset == "adapter" and not include_adapters:
            continue
        for rel, data in files.items():
            out[f"{asset}/{partition_dirname(key)}/{rel}"] = data
    out.update({f"logs/{rel}": data for rel, data in LOG_FILES.items()})
    return out


def without_manifests(t: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in t.items() if not k.endswith(MANIFEST_NAME)}


def test_fetch_twice_is_idempotent_and_never_nests(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fetch", "--no-progress"]) == 0
    first = capsys.readouterr().out
    dest = tmp_path / "results"
    assert without_manifests(tree(dest)) == expected_results()
    assert (dest / "spectral_features" / "tiny-test+sft-arith-r4-s0" / MANIFEST_NAME).is_file()
    assert "copied 7 files" in first
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}

    assert main(["fetch", "--no-progress"]) == 0
    second = capsys.readouterr().out
    assert "copied 0 files (0.0 MB), 7 already up to date, removed 0" in second
    assert not (dest / "results").exists()
    assert not (dest / "spectral_features" / "spectral_features").exists()
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()} == mtimes


def test_fetch_replaces_changed_files_and_removes_stale_ones(root, tmp_path, capsys):
    dest = tmp_path / "out"
    assert main(["fetch", "--dest", str(dest), "--no-progress"]) == 0
    part = dest / "spectral_features" / "tiny-test+dpo-arith-r4-s0"
    (part / "features.parquet").write_bytes(b"B" * 6999 + b"C")  # same size, other bytes
    (part / "leftover.tmp").write_bytes(b"x")
    (dest / "logs" / "orchestrator.log").write_bytes(b"truncated")
    capsys.readouterr()
    assert main(["fetch", "--dest", str(dest), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "copied 2 files" in out and "removed 1" in out
    assert without_manifests(tree(dest)) == expected_results()


def test_fetch_adapters_on_request(root, tmp_path):
    dest = tmp_path / "out"
    assert main(["fetch", "--dest", str(dest), "--include", "adapters", "--no-progress"]) == 0
    assert without_manifests(tree(dest)) == expected_results(include_adapters=True)


def test_fetch_shows_a_progress_bar(root, tmp_path, capsys):
    assert main(["fetch", "--dest", str(tmp_path / "out")]) == 0
    assert "lab fetch" in capsys.readouterr().err


def test_fetch_reports_a_storage_error(tmp_path, monkeypatch, emulator, capsys):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.setenv("LAB_EXPERIMENT", str(SMALL_EXPERIMENT))
    code = main(["fetch", "--storage", "gs://no-such-bucket/x", "--dest", str(tmp_path / "o")])
    assert code == 1
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
