"""The local artifact store: manifest last, nothing half-there, corruption detected."""

import json
import shlex
import shutil

import pytest

from resources.storage.base import (
    MANIFEST_NAME,
    IncompletePartitionError,
    StorageError,
    sha256_file,
)
from resources.storage.local import LocalArtifactStore


def make_src(tmp_path, files):
    src = tmp_path / "src"
    shutil.rmtree(src, ignore_errors=True)
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return src


def test_commit_layout_and_manifest(tmp_path):
    store = LocalArtifactStore(str(tmp_path / "root"), "exp")
    src = make_src(tmp_path, {"a.bin": b"x" * 10, "sub/b.json": b"{}"})
    m = store.commit("adapter", "tiny|sft-arith-r8-s0", src, metadata={"fingerprint": "f1"})
    # The folder is the key made shell-safe; listing gives the key back.
    d = tmp_path / "root" / "exp" / "adapter" / "tiny+sft-arith-r8-s0"
    assert store.local_path("adapter", "tiny|sft-arith-r8-s0") == d
    on_disk = json.loads((d / MANIFEST_NAME).read_text())
    assert on_disk["files"] == [
        {"path": "a.bin", "size": 10, "sha256": sha256_file(d / "a.bin")},
        {"path": "sub/b.json", "size": 2, "sha256": sha256_file(d / "sub/b.json")},
    ]
    assert on_disk["metadata"] == {"fingerprint": "f1"} and m.total_bytes == 12
    assert store.list_partitions("adapter") == ["tiny|sft-arith-r8-s0"]
    assert store.verify("adapter", "tiny|sft-arith-r8-s0") == []
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no staging left
    # unpartitioned assets live under "all"
    store.commit("classification_results", None, src)
    assert (tmp_path / "root" / "exp" / "classification_results" / "all" / "a.bin").exists()


def test_without_manifest_a_partition_is_missing(tmp_path):
    store = LocalArtifactStore(str(tmp_path), "exp")
    d = tmp_path / "exp" / "adapter" / "p1"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"partial")
    assert not store.is_complete("adapter", "p1")
    assert store.list_partitions("adapter") == []
    with pytest.raises(IncompletePartitionError, match=r"exp/adapter/p1: partition is missing"):
        store.local_path("adapter", "p1")


def test_a_failed_rewrite_keeps_the_old_partition(tmp_path, monkeypatch):
    store = LocalArtifactStore(str(tmp_path / "root"), "exp")
    store.commit("adapter", "p1", make_src(tmp_path, {"w": b"old"}))
    import resources.storage.local as storage_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(storage_mod, "_write_atomic", boom)
    with pytest.raises(OSError, match="disk full"):
        store.commit("adapter", "p1", make_src(tmp_path, {"w": b"new"}))
    monkeypatch.undo()
    d = store.local_path("adapter", "p1")
    assert (d / "w").read_bytes() == b"old" and store.verify("adapter", "p1") == []
    assert [p.name for p in d.parent.iterdir()] == ["p1"]  # staging cleaned up
    store.commit("adapter", "p1", make_src(tmp_path, {"w2": b"new"}))
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST_NAME, "w2"]  # old files gone


def test_verify_finds_corruption_and_truncation(tmp_path):
    store = LocalArtifactStore(str(tmp_path), "exp")
    store.commit("m", "p", make_src(tmp_path, {"a": b"aaaa", "b": b"bbbb", "c": b"cc"}))
    d = store.local_path("m", "p")
    (d / "a").write_bytes(b"aaab")
    (d / "b").write_bytes(b"bb")
    (d / "c").unlink()
    problems = store.verify("m", "p")
    assert any(p.endswith("/a: sha256 mismatch") for p in problems)
    assert any(p.endswith("/b: size 2 != 4") for p in problems)
    assert any(p.endswith("/c: missing") for p in problems)


def test_unsafe_names_refused(tmp_path):
    store = LocalArtifactStore(str(tmp_path), "exp")
    with pytest.raises(StorageError):
        store.commit("adapter", "", make_src(tmp_path, {"a": b"1"}))
    with pytest.raises(StorageError):
        store.uri("../etc", "p")


@pytest.mark.parametrize(
    ("key", "folder"),
    [("a/b", "a%2Fb"), ("..", "%2E."), ("m|r x$(id)", "m+r%20x%24%28id%29"), ("m|a+b", "m+a%2Bb")],
)
def test_partition_folders_are_shell_safe_and_give_the_key_back(tmp_path, key, folder):
    store = LocalArtifactStore(str(tmp_path), "exp")
    store.commit("adapter", key, make_src(tmp_path, {"a": b"1"}))
    assert [p.name for p in (tmp_path / "exp" / "adapter").iterdir() if p.is_dir()] == [folder]
    assert shlex.quote(folder) == folder
    assert store.list_partitions("adapter") == [key]
