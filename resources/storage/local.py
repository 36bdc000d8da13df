"""The local backend of the artifact store: a directory tree on this machine.

A commit copies the files into a staging directory beside the partition, writes the
manifest there last, and swaps it in. On Linux the swap is one atomic
``renameat2(RENAME_EXCHANGE)``: the partition's path names the old complete directory,
then the new one, never anything else. Elsewhere (or on a filesystem without it) the old
partition loses its manifest before it is moved aside and the new one is renamed in, so
a half-written partition never reads as complete.

Concurrency: each partition has a lock file, ``<root>/.locks/<experiment>/<asset>/<key>.lock``
(outside the partition, so never a stray file). A committer stages its files unlocked,
then takes the lock exclusively for the swap, waiting up to ``lock_timeout_s``; readers
(``read_manifest``, ``local_path``, ``check``, ``verify``, ``verified_path``) hold it
shared while they read the manifest and check the files against it, so they see the old
complete version or the new one, never a mix. Like the GCS store, a commit is
conditional on the manifest it saw when it started: of two overlapping commits of one
partition the first to swap wins and the other raises `ConcurrentWriteError`, leaving
no staging or old directory behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resources import procs
from resources.storage.base import (
    CHEAP,
    FULL,
    MANIFEST_NAME,
    ArtifactStore,
    ConcurrentWriteError,
    FileProblem,
    IncompletePartitionError,
    IntegrityError,
    Manifest,
    StorageError,
    partition_dirname,
    partition_from_dirname,
    partition_label,
    scan_dir,
    verify_dir,
)
from resources.storage.integrity import check_dir

#: Lab-owned side directory under the root holding per-partition lock files.
LOCK_DIR = ".locks"


class LocalArtifactStore(ArtifactStore):
    """A local directory tree. Writes stage in a sibling directory and swap in atomically."""

    #: How long a commit waits for the partition's lock (held by another committer's swap,
    #: or by readers checking the files), and a reader for a committer's swap, before
    #: giving up with `ConcurrentWriteError`.
    lock_timeout_s: float = 120.0

    def _dir(self, asset: str, partition: str | None) -> Path:
        return Path(self.uri(asset, partition))

    def _lock_path(self, asset: str, partition: str | None) -> Path:
        self.uri(asset, partition)  # validates both names
        return (
            Path(self.root)
            / LOCK_DIR
            / self.experiment
            / asset
            / f"{partition_dirname(partition)}.lock"
        )

    @contextlib.contextmanager
    def _locked(self, asset: str, partition: str | None, *, exclusive: bool) -> Iterator[None]:
        """Hold the partition's lock: exclusive (a commit's swap, bounded wait) or shared.

        A reader that cannot create the lock file (a read-only root) reads unlocked.
        """
        path = self._lock_path(asset, partition)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if not exclusive:
                yield
                return
            raise StorageError(
                f"{self.uri(asset, partition)}: cannot create the lock file {path}: {e}"
            ) from e
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + self.lock_timeout_s
        try:
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ConcurrentWriteError(
                            f"{self.uri(asset, partition)}: another writer is committing "
                            f"{asset}/{partition_label(partition)}"
                            + (" (or a reader is checking it)" if exclusive else "")
                            + f" and has held its lock {path} for over "
                            f"{self.lock_timeout_s:g} s"
                            + ("; this writer's files were discarded" if exclusive else "")
                            + "; try again"
                        ) from None
                    time.sleep(0.005 if not exclusive else 0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    def commit(
        self, asset: str, partition: str | None, src: Path, metadata: dict[str, Any] | None = None
    ) -> Manifest:
        src = Path(src)
        if not src.is_dir():
            raise StorageError(f"{asset}[{partition}]: output {src} is not a directory")
        target = self._dir(asset, partition)
        key = partition_dirname(partition)
        with self._locked(asset, partition, exclusive=False):
            seen = _read_text(target / MANIFEST_NAME)  # the version this commit replaces
        target.parent.mkdir(parents=True, exist_ok=True)
        token = f"{_HOST}.{os.getpid()}-{uuid.uuid4().hex[:8]}"  # whose: see remove_leftovers
        staging = target.parent / f".staging-{key}-{token}"
        old = target.parent / f".old-{key}-{token}"
        try:
            shutil.copytree(src, staging, ignore=shutil.ignore_patterns(MANIFEST_NAME))
            manifest = Manifest(
                asset=asset,
                partition=partition_label(partition),
                files=scan_dir(staging),
                created_at=time.time(),
                metadata=dict(metadata or {}),
            )
            _write_atomic(staging / MANIFEST_NAME, manifest.to_json())
            with self._locked(asset, partition, exclusive=True):
                if _read_text(target / MANIFEST_NAME) != seen:
                    raise ConcurrentWriteError(
                        f"{self.uri(asset, partition)}: another writer committed "
                        f"{asset}/{partition_label(partition)} while this one was staging its "
                        "files; this writer's files were discarded; try again"
                    )
                if not target.exists():
                    staging.rename(target)
                elif _exchange(staging, target):
                    pass  # the old partition is now at `staging`, removed below
                else:
                    # Drop the old manifest first: between the renames nothing reads as complete.
                    (target / MANIFEST_NAME).unlink(missing_ok=True)
                    target.rename(old)
                    try:
                        staging.rename(target)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            old.rename(target)  # its files back (it reads as missing)
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        return manifest

    def _read_manifest(self, asset: str, partition: str | None) -> Manifest | None:
        """`read_manifest` for a caller already holding the partition's lock."""
        path = self._dir(asset, partition) / MANIFEST_NAME
        text = _read_text(path)
        return None if text is None else Manifest.from_json(text, str(path))

    def read_manifest(self, asset: str, partition: str | None) -> Manifest | None:
        with self._locked(asset, partition, exclusive=False):
            return self._read_manifest(asset, partition)

    def local_path(self, asset: str, partition: str | None) -> Path:
        if self.read_manifest(asset, partition) is None:
            raise IncompletePartitionError(
                f"{self.uri(asset, partition)}: partition is missing or incomplete (no manifest)"
            )
        return self._dir(asset, partition)

    def remove_leftovers(self) -> list[Path]:
        """Delete staging and old directories left by a committer that died mid-commit
        (SIGKILL between its copy and its cleanup); returns them. One of a live process
        (or of another host, on a shared filesystem) is left alone unless it is old."""
        removed: list[Path] = []
        base = Path(self.root) / self.experiment
        if not base.is_dir():
            return removed
        for asset_dir in (p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for d in asset_dir.glob(".*"):
                if not d.name.startswith((".staging-", ".old-")) or not d.is_dir():
                    continue
                m = _TOKEN.search(d.name)
                mine = m is not None and m.group(1) == _HOST
                try:
                    old = time.time() - d.stat().st_mtime > _LEFTOVER_AGE_S
                except OSError:
                    continue
                if (mine and not procs.alive(int(m.group(2)))) or old:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
        return removed

    def list_partitions(self, asset: str) -> list[str]:
        base = Path(self.root) / self.experiment / asset
        if not base.is_dir():
            return []
        return sorted(
            partition_from_dirname(p.name)
            for p in base.iterdir()
            if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
        )

    def verify(self, asset: str, partition: str | None) -> list[str]:
        where = self.uri(asset, partition)
        with self._locked(asset, partition, exclusive=False):
            manifest = self._read_manifest(asset, partition)
            if manifest is None:
                return [f"{where}: no manifest"]
            return verify_dir(self._dir(asset, partition), manifest, where)

    def check(
        self,
        asset: str,
        partition: str | None,
        manifest: Manifest | None = None,
        *,
        level: str = CHEAP,
    ) -> list[FileProblem]:
        """See `ArtifactStore.check`; `FULL` re-hashes every file, remembered hashes aside."""
        with self._locked(asset, partition, exclusive=False):
            manifest = manifest or self._read_manifest(asset, partition)
            if manifest is None:
                return []
            return check_dir(self._dir(asset, partition), manifest, level=level, trust_stamps=False)

    def verified_path(self, asset: str, partition: str | None) -> Path:
        """The partition's directory, checked in full; an untouched file is hashed once.

        The manifest is read and the files checked under the partition's shared lock, so a
        concurrent commit cannot swap the partition mid-check; the retry covers a root
        whose lock file cannot be created (read unlocked).
        """
        d = self._dir(asset, partition)
        for _ in range(3):
            with self._locked(asset, partition, exclusive=False):
                manifest = self._read_manifest(asset, partition)
                if manifest is None:
                    raise IncompletePartitionError(
                        f"{self.uri(asset, partition)}: partition is missing or incomplete "
                        "(no manifest)"
                    )
                problems = check_dir(d, manifest, level=FULL)
                if not problems:
                    return d
                if self._read_manifest(asset, partition) == manifest:
                    raise IntegrityError(asset, partition, str(d), problems)
            # A commit replaced the partition while it was checked: check the new one.
        raise IntegrityError(asset, partition, str(d), problems)


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TOKEN = re.compile(r"-([0-9a-f]{8})\.(\d+)-[0-9a-f]{8}$")  # host hash, pid, random
_LEFTOVER_AGE_S = 24 * 3600.0  # another host's (or an unnamed) leftover counts as dead by then


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):  # (a file where a directory would be)
        return None


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Any = None
if sys.platform.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        _renameat2.argtypes += [ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (OSError, AttributeError):  # no glibc 2.28+: fall back to two renames
        _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux `RENAME_EXCHANGE`); False if unsupported."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this filesystem or kernel cannot exchange: two renames instead
    raise OSError(err, os.strerror(err), str(a), None, str(b))
