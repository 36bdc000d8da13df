"""The GCS artifact store against the real GCS emulator (fake-gcs-server).

No storage client is mocked: faults come from `FaultProxy`, a local HTTP proxy in front
of the emulator that answers 503/429/403 itself, drops connections, loses answers or
delays requests, and stands in for the XML multipart API the emulator lacks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab_assets_tests.fakes.gcs_emulator import Emulator, FaultProxy
from resources.storage.base import MANIFEST_NAME, IncompletePartitionError
from resources.storage.gcs.client import ConcurrentWriteError, GCSError, make_client, retry_policy
from resources.storage.gcs.manifest_dir import COMMIT_DIR_PREFIX
from resources.storage.gcs.session import GCSSession, TransferConfig
from resources.storage.gcs.store import GCSArtifactStore
from resources.storage.local import LocalArtifactStore
from resources.storage.open import open_store

REPO_ROOT = Path(__file__).resolve().parents[3]
BUCKET = "lab-test"
SMALL = TransferConfig(sliced_threshold=1 << 20, chunk_size=256 << 10, max_workers=4)


@pytest.fixture(scope="module")
def emulator():
    with Emulator() as emu:
        emu.create_bucket(BUCKET)
        yield emu


def make_store(
    endpoint: str,
    prefix: str,
    cache_dir: Path,
    *,
    transfer: TransferConfig = SMALL,
    timeout: float = 20.0,
    **kw,
) -> GCSArtifactStore:
    session = GCSSession(
        make_client(endpoint=endpoint),
        retry=retry_policy(initial=0.01, maximum=0.2, timeout=timeout),
        transfer=transfer,
    )
    return GCSArtifactStore(
        f"gs://{BUCKET}/{prefix}", "exp", session=session, cache_dir=cache_dir, **kw
    )


@pytest.fixture
def store(emulator, tmp_path) -> GCSArtifactStore:
    return make_store(emulator.url, tmp_path.name, tmp_path / "cache")


def write_tree(d: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


def read_tree(d: Path) -> dict[str, bytes]:
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def names(store: GCSArtifactStore, rel: str = "") -> list[str]:
    prefix = f"{store._base}/{rel}".rstrip("/") + "/"
    return sorted(b.name for b in store.session.client.list_blobs(BUCKET, prefix=prefix))


V1 = {"adapter_config.json": b'{"r": 4}', "weights/a.safetensors": os.urandom(300_000)}
V2 = {"adapter_config.json": b'{"r": 8}', "weights/b.safetensors": os.urandom(200_000)}


def test_commit_read_list_verify_with_the_disk_layout(store, tmp_path):
    src = write_tree(tmp_path / "src", V1)
    m = store.commit("adapter", "tiny|sft-arith-r4-s0", src, metadata={"fingerprint": "abc"})
    assert [f.path for f in m.files] == ["adapter_config.json", "weights/a.safetensors"]
    assert store.read_manifest("adapter", "tiny|sft-arith-r4-s0") == m
    assert store.uri("adapter", "tiny|sft-arith-r4-s0") == (
        f"gs://{BUCKET}/{tmp_path.name}/exp/adapter/tiny+sft-arith-r4-s0"
    )
    objs = names(store, "adapter")
    base = f"{tmp_path.name}/exp/adapter/tiny+sft-arith-r4-s0"
    assert f"{base}/{MANIFEST_NAME}" in objs
    commit_dirs = {n[len(base) + 1 :].split("/")[0] for n in objs if n != f"{base}/manifest.json"}
    assert len(commit_dirs) == 1 and commit_dirs.pop().startswith(COMMIT_DIR_PREFIX)
    assert store.list_partitions("adapter") == ["tiny|sft-arith-r4-s0"]
    assert store.verify("adapter", "tiny|sft-arith-r4-s0") == []
    local = store.local_path("adapter", "tiny|sft-arith-r4-s0")
    assert read_tree(local) == V1
    assert store.read_manifest("adapter", "other") is None
    assert not store.is_complete("adapter", "other")
    with pytest.raises(IncompletePartitionError):
        store.local_path("adapter", "other")


def test_unpartitioned_assets_use_all(store, tmp_path):
    store.commit("classification_results", None, write_tree(tmp_path / "s", {"r.json": b"{}"}))
    assert store.list_partitions("classification_results") == ["all"]
    assert read_tree(store.local_path("classification_results", None)) == {"r.json": b"{}"}


def test_open_store_goes_to_the_emulator_named_by_the_environment(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "lab-project")
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    store = open_store(f"gs://{BUCKET}/{tmp_path.name}", "exp")
    assert isinstance(store, GCSArtifactStore)
    assert store.session.client.project == "lab-project"
    store.commit("spectral_features", "p", write_tree(tmp_path / "s", {"f.parquet": b"x"}))
    assert store.local_path("spectral_features", "p").is_relative_to(tmp_path / "cache")


def test_replacing_a_partition_deletes_the_old_objects(store, tmp_path):
    store.commit("adapter", "p", write_tree(tmp_path / "v1", V1))
    first = names(store, "adapter/p")
    store.commit("adapter", "p", write_tree(tmp_path / "v2", V2))
    after = names(store, "adapter/p")
    assert not set(first) & (set(after) - {f"{store._base}/adapter/p/{MANIFEST_NAME}"})
    assert len(after) == 1 + len(V2)
    assert read_tree(store.local_path("adapter", "p")) == V2


def test_local_cache_reuses_unchanged_and_refetches_changed(emulator, tmp_path):
    with FaultProxy(emulator.url) as proxy:
        store = make_store(proxy.url, tmp_path.name, tmp_path / "cache")
        store.commit("adapter", "p", write_tree(tmp_path / "v1", V1))
        first = store.local_path("adapter", "p")
        proxy.log.clear()
        assert store.local_path("adapter", "p") == first
        media = [p for m, p, _ in proxy.log if "alt=media" in p and MANIFEST_NAME not in p]
        assert media == [], "an unchanged partition is served from the cache"
        # A file edited in the cache is noticed and fetched again.
        (first / "adapter_config.json").write_bytes(b'{"r": 5}')
        again = store.local_path("adapter", "p")
        assert read_tree(again) == V1
        # A replaced partition gets a new cache directory; the old one is pruned.
        store.commit("adapter", "p", write_tree(tmp_path / "v2", V2))
        newer = store.local_path("adapter", "p")
        assert newer != first and read_tree(newer) == V2
        assert not first.exists()


def test_big_files_move_in_parallel_slices_with_checksums(emulator, tmp_path):
    big = os.urandom(3 << 20)
    with FaultProxy(emulator.url, xml_multipart=True) as proxy:
        cfg = TransferConfig(
            sliced_threshold=1 << 20, chunk_size=512 << 10, max_workers=4, sliced_upload=True
        )
        store = make_store(proxy.url, tmp_path.name, tmp_path / "cache", transfer=cfg)
        src = write_tree(tmp_path / "src", {"model.safetensors": big, "config.json": b"{}"})
        store.commit("base_model", "tiny", src)
        assert proxy.mpu_parts == 6  # 3 MiB in 512 KiB parts, through the XML multipart API
        path = store.local_path("base_model", "tiny")
        assert proxy.ranged_gets >= 6  # sliced download
        assert (path / "model.safetensors").read_bytes() == big
        assert store.verify("base_model", "tiny") == []


def test_emulators_get_single_stream_uploads_by_default(store):
    assert store.session.transfer.sliced_upload is None
    assert store.session.sliced_upload is False


def test_transient_errors_are_retried(emulator, tmp_path):
    with FaultProxy(emulator.url) as proxy:
        store = make_store(proxy.url, tmp_path.name, tmp_path / "cache")
        proxy.add(503, times=3)
        proxy.add(429, times=2, match=lambda r: r.method == "POST")
        proxy.add("drop", times=2, match=lambda r: "alt=media" in r.path)
        proxy.add(500, times=1, match=lambda r: r.method == "GET" and "/o?" in r.path)
        store.commit("adapter", "p", write_tree(tmp_path / "src", V1))
        assert read_tree(store.local_path("adapter", "p")) == V1
        assert store.list_partitions("adapter") == ["p"]
        assert proxy.injected == 8
        assert store.verify("adapter", "p") == []


def test_a_lost_answer_to_a_preconditioned_write_is_recognised(emulator, tmp_path):
    """The write landed, its answer was lost; the retry fails its precondition: not an error."""
    with FaultProxy(emulator.url) as proxy:
        store = make_store(proxy.url, tmp_path.name, tmp_path / "cache")
        proxy.add(
            "lose", times=1, match=lambda r: b'"name": "' in r.body and b"a.safetensors" in r.body
        )
        proxy.add("lose", times=1, match=lambda r: b"manifest.json" in r.body)
        store.commit("adapter", "p", write_tree(tmp_path / "src", V1))
        assert proxy.injected == 2
        assert [s for _, _, s in proxy.log].count(412) == 2
        assert read_tree(store.local_path("adapter", "p")) == V1


def test_retries_give_up_with_a_clear_error(emulator, tmp_path):
    with FaultProxy(emulator.url) as proxy:
        store = make_store(proxy.url, tmp_path.name, tmp_path / "cache", timeout=0.5)
        proxy.add(503)
        with pytest.raises(GCSError) as e:
            store.read_manifest("adapter", "p")
        msg = str(e.value)
        assert f"gs://{BUCKET}/{tmp_path.name}/exp/adapter/p/manifest.json" in msg
        assert "retry deadline" in msg and "HTTP 503" in msg


def test_permission_denied_fails_fast_naming_bucket_and_object(emulator, tmp_path):
    with FaultProxy(emulator.url) as proxy:
        store = make_store(proxy.url, tmp_path.name, tmp_path / "cache")
        src = write_tree(tmp_path / "src", V1)
        # Read access but no write access (a read-only service account).
        proxy.add(403, match=lambda r: r.method == "POST")
        t0 = time.monotonic()
        with pytest.raises(GCSError) as e:
            store.commit("adapter", "p", src)
        assert time.monotonic() - t0 < 5, "403 is permanent: no retrying"
        msg = str(e.value)
        assert "permission denied (403)" in msg and f"bucket '{BUCKET}'" in msg
        assert f"gs://{BUCKET}/{tmp_path.name}/exp/adapter/p/{COMMIT_DIR_PREFIX}" in msg
        assert "storage.objects access" in msg  # the server's own words
        proxy.clear()
        proxy.add(403)
        with pytest.raises(GCSError, match=r"permission denied \(403\).*manifest"):
            store.read_manifest("adapter", "p")
        proxy.clear()
        assert not store.is_complete("adapter", "p")
        assert names(store, "adapter/p") == []


def test_a_missing_bucket_is_named(emulator, tmp_path):
    store = GCSArtifactStore(
        "gs://no-such-bucket/x",
        "exp",
        session=GCSSession(make_client(endpoint=emulator.url), retry=retry_policy(timeout=5)),
    )
    for call in (
        lambda: store.commit("adapter", "p", write_tree(tmp_path / "s", V1)),
        lambda: store.read_manifest("adapter", "p"),
        lambda: store.list_partitions("adapter"),
    ):
        with pytest.raises(GCSError, match=r"bucket 'no-such-bucket' does not exist"):
            call()


def test_a_failed_upload_leaves_the_previous_version_and_no_debris(emulator, tmp_path):
    with FaultProxy(emulator.url) as proxy:
        store = make_store(proxy.url, tmp_path.name, tmp_path / "cache")
        store.commit("adapter", "p", write_tree(tmp_path / "v1", V1))
        before = names(store, "adapter/p")
        v2 = {f"f{i:02d}.bin": os.urandom(1000) for i in range(12)}
        uploads = {"n": 0}

        def fifth_upload_on(r) -> bool:
            if r.method == "POST" and "/upload/" in r.path:
                uploads["n"] += 1
                return uploads["n"] >= 5
            return False

        proxy.add(400, match=fifth_upload_on)
        with pytest.raises(GCSError):
            store.commit("adapter", "p", write_tree(tmp_path / "v2", v2))
        proxy.clear()
        assert names(store, "adapter/p") == before, "the failed commit's objects are deleted"
        assert read_tree(store.local_path("adapter", "p")) == V1


_KILLABLE_COMMIT = """
import sys
from pathlib import Path
from resources.storage.gcs.client import make_client
from resources.storage.gcs.session import GCSSession, TransferConfig
from resources.storage.gcs.store import GCSArtifactStore
endpoint, prefix, src = sys.argv[1:4]
session = GCSSession(make_client(endpoint=endpoint), transfer=TransferConfig(max_workers=1))
store = GCSArtifactStore(f"gs://lab-test/{prefix}", "exp", session=session)
print("uploading", flush=True)
store.commit("adapter", "p", Path(src))
print("committed", flush=True)
"""


def _kill_mid_upload(proxy: FaultProxy, prefix: str, src: Path, store: GCSArtifactStore) -> None:
    """Run a commit in a subprocess and SIGKILL it once a few files are uploaded."""
    proxy.add("delay", seconds=0.05, match=lambda r: r.method == "POST")
    before = set(names(store, "adapter/p"))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_COMMIT, proxy.url, prefix, str(src)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            uploaded = [n for n in names(store, "adapter/p") if n not in before]
            if len(uploaded) >= 4:
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        assert all(f"/{COMMIT_DIR_PREFIX}" in n for n in uploaded)
        assert len({n.split("/")[-2] for n in uploaded}) == 1  # one new commit directory
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.clear()


def test_a_killed_upload_reads_as_missing_then_previous_version_intact(emulator, tmp_path):
    v2 = {f"f{i:02d}.bin": os.urandom(2000) for i in range(40)}
    src = write_tree(tmp_path / "v2", v2)
    with FaultProxy(emulator.url) as proxy:
        store = make_store(emulator.url, tmp_path.name, tmp_path / "cache")
        # A first write killed midway: the partition reads as missing.
        _kill_mid_upload(proxy, tmp_path.name, src, store)
        assert store.read_manifest("adapter", "p") is None
        assert store.list_partitions("adapter") == []
        assert any(f"/{COMMIT_DIR_PREFIX}" in n for n in names(store, "adapter/p"))

        # A replacement killed midway: the previous version is intact.
        store.commit("adapter", "p", write_tree(tmp_path / "v1", V1))
        _kill_mid_upload(proxy, tmp_path.name, src, store)
        assert store.verify("adapter", "p") == []
        assert read_tree(store.local_path("adapter", "p")) == V1
        m = store.read_manifest("adapter", "p")
        assert [f.path for f in m.files] == sorted(V1)

    # Abandoned commit directories are swept by a later commit once past the grace period.
    assert len({n.split("/")[-2] for n in names(store, "adapter/p") if "/f" in n}) == 2
    sweeper = make_store(emulator.url, tmp_path.name, tmp_path / "cache", orphan_grace_s=0)
    sweeper.commit("adapter", "p", write_tree(tmp_path / "v3", V2))
    assert len(names(store, "adapter/p")) == 1 + len(V2)


def test_racing_writers_cannot_interleave(emulator, tmp_path):
    slow_files = {f"slow{i:02d}.bin": os.urandom(1000) for i in range(10)}
    fast_files = {f"fast{i:02d}.bin": os.urandom(1000) for i in range(3)}
    with FaultProxy(emulator.url) as proxy:
        proxy.add("delay", seconds=0.1, match=lambda r: r.method == "POST")
        slow = make_store(
            proxy.url, tmp_path.name, tmp_path / "c1", transfer=TransferConfig(max_workers=1)
        )
        fast = make_store(emulator.url, tmp_path.name, tmp_path / "c2")
        outcome: dict[str, object] = {}

        def run_slow() -> None:
            try:
                outcome["slow"] = slow.commit(
                    "adapter", "p", write_tree(tmp_path / "a", slow_files)
                )
            except Exception as e:
                outcome["slow"] = e

        t = threading.Thread(target=run_slow)
        t.start()
        deadline = time.monotonic() + 30
        while not any("/slow" in n for n in names(fast, "adapter/p")):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # The slow writer has read the (missing) manifest and is uploading: race it.
        won = fast.commit("adapter", "p", write_tree(tmp_path / "b", fast_files))
        t.join(60)

    err = outcome["slow"]
    assert isinstance(err, ConcurrentWriteError), err
    assert "another writer committed" in str(err) and "adapter/p" in str(err)
    assert fast.read_manifest("adapter", "p") == won
    assert read_tree(fast.local_path("adapter", "p")) == fast_files
    assert fast.verify("adapter", "p") == []
    left = names(fast, "adapter/p")
    assert not any("/slow" in n for n in left), "the loser removed its upload"
    assert len(left) == 1 + len(fast_files)


def test_a_reader_restarts_when_the_partition_is_replaced_under_it(emulator, tmp_path):
    writer = make_store(emulator.url, tmp_path.name, tmp_path / "c1")
    writer.commit("adapter", "p", write_tree(tmp_path / "v1", V1))
    with FaultProxy(emulator.url) as proxy:
        # The reader's first data download waits until a new commit has replaced v1.
        proxy.add("delay", times=1, seconds=0.5, match=lambda r: ".commit-" in r.path)
        reader = make_store(proxy.url, tmp_path.name, tmp_path / "c2")
        result: dict[str, Path] = {}
        t = threading.Thread(target=lambda: result.update(p=reader.local_path("adapter", "p")))
        t.start()
        deadline = time.monotonic() + 10
        while not any(MANIFEST_NAME in p for _, p, _ in proxy.log):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        writer.commit("adapter", "p", write_tree(tmp_path / "v2", V2))
        t.join(30)
        assert any(status == 404 for _, _, status in proxy.log)
    assert read_tree(result["p"]) == V2


def test_a_flat_rsynced_partition_reads_and_verifies(emulator, tmp_path):
    """A local partition copied up as is (`gcloud storage rsync`) is readable too."""
    local = LocalArtifactStore(str(tmp_path / "local"), "exp")
    local.commit("spectral_features", "p", write_tree(tmp_path / "s", V1))
    store = make_store(emulator.url, tmp_path.name, tmp_path / "cache")
    bucket = store.session.client.bucket(BUCKET)
    part = Path(local.uri("spectral_features", "p"))
    for f in part.rglob("*"):
        if f.is_file():
            rel = f.relative_to(part).as_posix()
            bucket.blob(f"{store._base}/spectral_features/p/{rel}").upload_from_filename(str(f))
    assert store.list_partitions("spectral_features") == ["p"]
    assert store.verify("spectral_features", "p") == []
    assert read_tree(store.local_path("spectral_features", "p")) == V1
    store.commit("spectral_features", "p", write_tree(tmp_path / "v2", V2))
    assert (
        names(store, "spectral_features/p").count(
            f"{store._base}/spectral_features/p/adapter_config.json"
        )
        == 0
    ), "the flat files of the replaced version are deleted"
