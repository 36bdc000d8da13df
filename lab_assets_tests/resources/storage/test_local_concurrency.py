"""The local store under concurrent writers and readers, in real processes.

Two processes commit one partition round after round (started together by a barrier)
while a third reads it: every commit either wins or loses with `ConcurrentWriteError`
(never a raw `OSError`), each round has a winner, no staging or old directory is left
behind, the final partition verifies, and a reader always gets a complete, verified
version. Both swap mechanisms are covered: the atomic `RENAME_EXCHANGE` and the
two-rename fallback for systems without it.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import re
import shutil
import traceback
from pathlib import Path

import pytest

import resources.storage.local as local_mod
from resources.storage.base import MANIFEST_NAME, ConcurrentWriteError
from resources.storage.local import LocalArtifactStore

ASSET, KEY = "adapter", "tiny|sft-arith-r8-s0"
FOLDER = "tiny+sft-arith-r8-s0"  # the partition's shell-safe directory name
KEY_RE = re.escape(KEY)
ROUNDS = 30


def _src(base: Path, tag: str) -> Path:
    src = base / f"src-{tag}"
    shutil.rmtree(src, ignore_errors=True)
    (src / "sub").mkdir(parents=True)
    (src / f"{tag}.tag").write_bytes(tag.encode())
    (src / "weights.bin").write_bytes(tag.encode() * 20_000)
    (src / "sub" / "config.json").write_text(f'{{"tag": "{tag}"}}')
    return src


def _writer(root, scratch, wid, rounds, barrier, results, use_exchange):
    if not use_exchange:
        local_mod._renameat2 = None
    store = LocalArtifactStore(root, "exp")
    out = []
    try:
        for r in range(rounds):
            src = _src(Path(scratch), f"w{wid}r{r}")
            barrier.wait(timeout=60)
            try:
                store.commit(ASSET, KEY, src)
                out.append((r, "won", ""))
            except ConcurrentWriteError as e:
                out.append((r, "lost", str(e)))
            except BaseException as e:  # noqa: BLE001 - reported to the test
                out.append((r, "other", f"{type(e).__name__}: {e}"))
    except BaseException:  # noqa: BLE001
        out.append((-1, "other", traceback.format_exc()))
    results.put((wid, out))


def _reader(root, stop, results, use_exchange):
    if not use_exchange:
        local_mod._renameat2 = None
    store = LocalArtifactStore(root, "exp")
    reads, bad = 0, []
    while not stop.is_set() and len(bad) < 5:
        try:
            m = store.read_manifest(ASSET, KEY)
            if m is None:
                bad.append("read_manifest: None")
            store.local_path(ASSET, KEY)
            d = store.verified_path(ASSET, KEY)
            tags = [f.path for f in m.files if f.path.endswith(".tag")] if m else []
            if len(tags) != 1:
                bad.append(f"manifest with tags {tags}")
            if store.check(ASSET, KEY):
                bad.append("check found problems")
            if not d.is_dir():
                bad.append("verified_path is not a directory")
            reads += 1
        except BaseException as e:  # noqa: BLE001 - reported to the test
            bad.append(f"{type(e).__name__}: {e}")
    results.put(("reader", (reads, bad)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "two-renames"])
def test_two_writers_and_a_reader_on_one_partition(tmp_path, monkeypatch, use_exchange):
    if use_exchange and local_mod._renameat2 is None:
        pytest.skip("no renameat2 here")
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    root = str(tmp_path / "root")
    store = LocalArtifactStore(root, "exp")
    store.commit(ASSET, KEY, _src(tmp_path, "initial"))

    ctx = mp.get_context("spawn")
    barrier, results, stop = ctx.Barrier(2), ctx.Queue(), ctx.Event()
    writers = [
        ctx.Process(
            target=_writer,
            args=(root, str(tmp_path / f"s{w}"), w, ROUNDS, barrier, results, use_exchange),
        )
        for w in (0, 1)
    ]
    reader = ctx.Process(target=_reader, args=(root, stop, results, use_exchange))
    reader.start()
    for p in writers:
        p.start()
    got = {}
    for _ in writers:
        wid, out = results.get(timeout=120)
        got[wid] = out
    stop.set()
    _, (reads, bad) = results.get(timeout=60)
    for p in [*writers, reader]:
        p.join(timeout=30)
        assert p.exitcode == 0

    others = [o for out in got.values() for o in out if o[1] == "other"]
    assert others == []  # never a raw OSError: won, or lost with the clear error
    for _, out in got.items():
        assert [r for r, _, _ in out] == list(range(ROUNDS))
        for _, how, msg in out:
            if how == "lost":
                assert f"another writer is committing {ASSET}/{KEY}" in msg or (
                    f"another writer committed {ASSET}/{KEY}" in msg
                )
                assert "try again" in msg
    winners = {r: [w for w in got if got[w][r][1] == "won"] for r in range(ROUNDS)}
    assert all(winners[r] for r in range(ROUNDS)), winners  # every round has a winner
    lost = sum(1 for out in got.values() for _, how, _ in out if how == "lost")
    assert lost + sum(len(w) for w in winners.values()) == 2 * ROUNDS

    # No leftovers: the asset directory holds the partition only.
    asset_dir = Path(root) / "exp" / ASSET
    assert [p.name for p in asset_dir.iterdir()] == [FOLDER]
    assert sorted(p.name for p in (asset_dir / FOLDER).iterdir()) == sorted(
        [MANIFEST_NAME, "sub", "weights.bin", next(iter(_tags(asset_dir / FOLDER)))]
    )
    assert store.verify(ASSET, KEY) == [] and store.check(ASSET, KEY) == []
    # The final version is a last-round winner's.
    final = next(iter(_tags(asset_dir / FOLDER)))
    assert final in {f"w{w}r{ROUNDS - 1}.tag" for w in winners[ROUNDS - 1]}

    assert bad == []  # a reader never saw a half-replaced partition
    assert reads > 0


def _tags(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.name.endswith(".tag")}


@pytest.mark.timeout(60)
def test_a_commit_that_cannot_get_the_lock_fails_clearly_and_cleans_up(tmp_path):
    store = LocalArtifactStore(str(tmp_path / "root"), "exp")
    store.commit(ASSET, KEY, _src(tmp_path, "old"))
    store.lock_timeout_s = 0.2
    lock = store._lock_path(ASSET, KEY)
    assert lock.is_relative_to(tmp_path / "root" / ".locks")
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a reader checking the files, for longer than allowed
        with pytest.raises(
            ConcurrentWriteError,
            match=rf"another writer is committing {ASSET}/{KEY_RE}.*discarded; try again",
        ):
            store.commit(ASSET, KEY, _src(tmp_path, "new"))
        assert store.read_manifest(ASSET, KEY) is not None  # readers share the lock
        fcntl.flock(fd, fcntl.LOCK_EX)  # a committer stuck mid-swap: readers give up too
        with pytest.raises(ConcurrentWriteError, match=rf"committing {ASSET}/{KEY_RE}.*try again"):
            store.verified_path(ASSET, KEY)
    finally:
        os.close(fd)
    d = tmp_path / "root" / "exp" / ASSET
    assert [p.name for p in d.iterdir()] == [FOLDER]  # no staging left
    assert _tags(d / FOLDER) == {"old.tag"} and store.verify(ASSET, KEY) == []


@pytest.mark.timeout(60)
def test_a_commit_overtaken_by_another_writer_loses(tmp_path, monkeypatch):
    root = str(tmp_path / "root")
    store, other = LocalArtifactStore(root, "exp"), LocalArtifactStore(root, "exp")
    store.commit(ASSET, KEY, _src(tmp_path, "old"))
    real_scan = local_mod.scan_dir
    calls = []

    def scan_then_overtake(d):
        files = real_scan(d)
        if not calls:
            calls.append(d)
            other.commit(ASSET, KEY, _src(tmp_path, "other"))  # lands while we stage
        return files

    monkeypatch.setattr(local_mod, "scan_dir", scan_then_overtake)
    with pytest.raises(ConcurrentWriteError, match=rf"another writer committed {ASSET}/{KEY_RE}"):
        store.commit(ASSET, KEY, _src(tmp_path, "mine"))
    d = tmp_path / "root" / "exp" / ASSET
    assert [p.name for p in d.iterdir()] == [FOLDER]
    assert _tags(d / FOLDER) == {"other.tag"} and store.verify(ASSET, KEY) == []
    store.commit(ASSET, KEY, _src(tmp_path, "mine"))  # a re-run replaces it
    assert _tags(d / FOLDER) == {"mine.tag"}
