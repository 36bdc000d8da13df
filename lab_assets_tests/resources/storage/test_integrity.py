"""Reads verify: a corrupt, truncated, missing or stray file stops an input before use.

Real files on disk (and in the GCS emulator): bytes are flipped in place with the
mtime restored by `os.utime`, as a careless tool or a bad disk copy would leave them.
Hash calls are counted through a wrapper, never timed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dagster import AssetKey, StaticPartitionsDefinition, build_input_context

import resources.storage.integrity as integrity
from lab_assets_tests.fakes.gcs_emulator import FaultProxy
from lab_assets_tests.resources.storage.test_gcs_store import (  # noqa: F401 (fixture)
    emulator,
    make_store,
    read_tree,
    write_tree,
)
from resources.io_manager import ArtifactIOManager, LabStorage
from resources.storage.base import CHEAP, FULL, IncompletePartitionError, IntegrityError
from resources.storage.local import LocalArtifactStore

WEIGHTS = "adapter_model.safetensors"
FILES = {WEIGHTS: os.urandom(50_000), "adapter_config.json": b'{"r": 8}'}
PART = "tiny|sft-arith-r8-s0"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Hash stamps (and GCS copies) go to this test's own cache directory."""
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def hashes(monkeypatch):
    """Counts sha256 computations per file name; files count as settled at once."""
    calls: list[str] = []
    real = integrity.sha256_file

    def counting(path: Path) -> str:
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    monkeypatch.setattr(integrity, "RACY_NS", 0)
    return calls


def flip_byte(path: Path, offset: int = 1000) -> None:
    """Flip one byte in place, keeping the size and restoring atime/mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def committed(tmp_path) -> tuple[LocalArtifactStore, Path]:
    store = LocalArtifactStore(str(tmp_path / "root"), "exp")
    store.commit("adapter", PART, write_tree(tmp_path / "src", FILES))
    return store, Path(store.uri("adapter", PART))


def load(store: LocalArtifactStore, partition: str = PART) -> Path:
    io = ArtifactIOManager(storage=LabStorage(root=store.root, experiment=store.experiment))
    with build_input_context(
        asset_key=AssetKey("adapter"),
        partition_key=partition,
        asset_partitions_def=StaticPartitionsDefinition([partition]),
    ) as ctx:
        return io.load_input(ctx)


def test_intact_input_loads(tmp_path):
    store, d = committed(tmp_path)
    assert load(store) == d


def test_flipped_byte_names_file_and_both_hashes(tmp_path):
    store, d = committed(tmp_path)
    load(store)
    manifest = store.read_manifest("adapter", PART)
    want = next(f.sha256 for f in manifest.files if f.path == WEIGHTS)
    flip_byte(d / WEIGHTS)
    with pytest.raises(IntegrityError) as e:
        load(store)
    found = integrity.sha256_file(d / WEIGHTS)
    msg = str(e.value)
    assert "adapter[tiny|sft-arith-r8-s0]" in msg and WEIGHTS in msg
    assert want in msg and found in msg and found != want
    (p,) = e.value.problems
    assert (p.path, p.kind, p.expected, p.found) == (WEIGHTS, "sha256", want, found)
    assert e.value.asset == "adapter" and e.value.partition == PART


def test_truncated_file_is_a_size_error(tmp_path):
    store, d = committed(tmp_path)
    with open(d / WEIGHTS, "r+b") as f:
        f.truncate(1234)
    with pytest.raises(IntegrityError, match=rf"{WEIGHTS} size 1234 != 50000"):
        load(store)


def test_stray_and_missing_files_are_reported(tmp_path):
    store, d = committed(tmp_path)
    (d / "extra.bin").write_bytes(b"12345")
    (d / "adapter_config.json").unlink()
    with pytest.raises(IntegrityError) as e:
        load(store)
    kinds = {(p.path, p.kind) for p in e.value.problems}
    assert kinds == {("extra.bin", "stray"), ("adapter_config.json", "missing")}
    assert "extra.bin stray file (5 bytes" in str(e.value)


def test_a_partition_without_manifest_is_still_incomplete(tmp_path):
    store, _ = committed(tmp_path)
    with pytest.raises(IncompletePartitionError):
        load(store, "other")


def test_unchanged_files_are_hashed_once_across_reads(tmp_path, hashes):
    store, d = committed(tmp_path)
    load(store)
    assert sorted(hashes) == sorted(FILES)
    hashes.clear()
    load(store)  # a new check, reading the stamps from the sidecar as another process would
    load(store)
    assert hashes == []
    # any write is noticed, though size and mtime are unchanged: ctime moved
    flip_byte(d / WEIGHTS)
    with pytest.raises(IntegrityError):
        load(store)
    assert hashes == [WEIGHTS]
    # the mismatch is remembered too: still an error, without hashing again
    hashes.clear()
    with pytest.raises(IntegrityError):
        load(store)
    assert hashes == []


def test_a_file_changed_just_before_hashing_is_not_trusted(tmp_path, hashes, monkeypatch):
    monkeypatch.setattr(integrity, "RACY_NS", 3600 * 10**9)  # every file counts as racy
    store, _ = committed(tmp_path)
    load(store)
    load(store)
    assert sorted(hashes) == sorted(list(FILES) * 2)


def test_lost_sidecar_only_costs_a_rehash(tmp_path, hashes):
    store, _ = committed(tmp_path)
    load(store)
    for p in (tmp_path / "cache" / "verified").iterdir():
        p.write_text("not json")
    hashes.clear()
    load(store)
    assert sorted(hashes) == sorted(FILES)


def test_cheap_check_sees_sizes_and_strays_full_check_sees_flips(tmp_path):
    store, d = committed(tmp_path)
    assert store.check("adapter", PART) == [] and store.check("adapter", PART, level=FULL) == []
    flip_byte(d / WEIGHTS)
    assert store.check("adapter", PART, level=CHEAP) == []
    (full,) = store.check("adapter", PART, level=FULL)
    assert full.short == f"{WEIGHTS} sha256 mismatch"
    (d / "stray.txt").write_bytes(b"x")
    with open(d / "adapter_config.json", "r+b") as f:
        f.truncate(2)
    cheap = store.check("adapter", PART)
    assert [p.short for p in cheap] == [
        "adapter_config.json size 2 != 8 (manifest)",
        "stray.txt stray file (1 bytes, not in the manifest)",
    ]
    assert store.check("adapter", "absent") == []


def test_full_check_rehashes_despite_stamps(tmp_path, hashes):
    store, _ = committed(tmp_path)
    load(store)
    hashes.clear()
    assert store.check("adapter", PART, level=FULL) == []
    assert sorted(hashes) == sorted(FILES)


# -- GCS: a cached copy edited after its download ---------------------------------


def test_gcs_cached_copy_modified_after_download_is_caught(emulator, tmp_path, hashes):  # noqa: F811
    store = make_store(emulator.url, tmp_path.name, tmp_path / "gcs-cache")
    store.commit("adapter", PART, write_tree(tmp_path / "src", FILES))
    first = store.verified_path("adapter", PART)
    assert read_tree(first) == FILES
    hashes.clear()
    assert store.verified_path("adapter", PART) == first  # reused, hashed (stamped) once
    assert store.verified_path("adapter", PART) == first
    assert sorted(hashes) == sorted(FILES)
    # a byte flipped in the cache, mtime restored: the pinned-mtime check alone misses it
    flip_byte(first / WEIGHTS)
    again = store.verified_path("adapter", PART)
    assert read_tree(again) == FILES, "the damaged copy was downloaded again"
    # server-side checks: cheap lists objects, full also hashes a copy
    assert store.check("adapter", PART) == []
    assert store.check("adapter", PART, level=FULL) == []


# -- GCS: corruption in transfer, and objects overwritten outside the lab -----------------


def _weights_get(r) -> bool:
    return r.method == "GET" and "alt=media" in r.path and WEIGHTS in r.path


def test_gcs_a_download_corrupted_in_transfer_once_is_downloaded_again(emulator, tmp_path):  # noqa: F811
    with FaultProxy(emulator.url) as proxy:
        store = make_store(proxy.url, tmp_path.name, tmp_path / "gcs-cache")
        store.commit("adapter", PART, write_tree(tmp_path / "src", FILES))
        proxy.add("corrupt", times=1, match=_weights_get)
        path = store.verified_path("adapter", PART)
        assert proxy.injected == 1  # one flipped byte in flight ...
        assert read_tree(path) == FILES  # ... and the copy used is the intact second download
        gets = [p for m, p, _ in proxy.log if m == "GET" and "alt=media" in p and WEIGHTS in p]
        assert len(gets) == 2


def test_gcs_a_download_corrupt_every_time_is_an_integrity_error(emulator, tmp_path):  # noqa: F811
    with FaultProxy(emulator.url) as proxy:
        store = make_store(proxy.url, tmp_path.name, tmp_path / "gcs-cache")
        store.commit("adapter", PART, write_tree(tmp_path / "src", FILES))
        proxy.add("corrupt", match=_weights_get)
        with pytest.raises(IntegrityError) as e:
            store.verified_path("adapter", PART)
        assert e.value.asset == "adapter" and e.value.partition == PART
        assert WEIGHTS in str(e.value) and "4 downloads" in str(e.value.__cause__)
        assert proxy.injected == 4
        assert [p.path.endswith(WEIGHTS) for p in e.value.problems] == [True]


def test_gcs_an_object_overwritten_outside_the_lab_is_corruption_not_a_race(emulator, tmp_path):  # noqa: F811
    store = make_store(emulator.url, tmp_path.name, tmp_path / "gcs-cache")
    store.commit("adapter", PART, write_tree(tmp_path / "src", FILES))
    [obj] = [o for o in store.list_objects("adapter") if o.path.endswith(WEIGHTS)]
    blob_name = f"{tmp_path.name}/exp/adapter/{obj.path}"
    store.session.bucket(store.bucket).blob(blob_name).upload_from_string(b"x" * 50_000)
    with pytest.raises(IntegrityError) as e:
        store.verified_path("adapter", PART)
    msg = str(e.value)
    assert "overwritten or deleted outside the lab" in str(e.value.__cause__)
    assert WEIGHTS in msg and "generation" in msg and "kept changing" not in msg
    # the stored-data check (what the sweep and the asset check run) says the same
    [problem] = store.check("adapter", PART)
    assert problem.kind == "generation" and problem.path == WEIGHTS
