"""Checking a local directory against its manifest, hashing each unchanged file only once.

Every read of a stored partition is verified before downstream code sees it (sizes,
sha256, missing and stray files), because a flipped byte is otherwise computed on
silently. Hashing multi-GB safetensors on every read would cost more than the read, so
the sha256 a file was found to have is remembered with the file's *identity*:
``(size, mtime_ns, inode, ctime_ns, device)``. Any write changes ``ctime``, which no user
can set (``os.utime`` fakes ``mtime`` only), so a file whose identity is unchanged holds
the bytes it was hashed with, and a changed one is hashed again.

The remembered hashes live in one small JSON sidecar per directory under
``<cache>/verified/`` (``$LAB_CACHE_DIR``, default ``<tmp>/lab-cache``), so they outlive
the process: Dagster runs every step in its own process, and a per-process memo would
hash every input once per step. Losing a sidecar costs one re-hash, never a wrong answer.

A "racily clean" file (changed within ``RACY_NS`` of being hashed) is not remembered:
``ctime`` has the kernel's coarse clock granularity (milliseconds, seconds on some
network filesystems), so a second write in the same tick would leave it unchanged. Such
a file is simply hashed again on its next read, as git does with its index.

What this does not catch: corruption that bypasses the file system (bit rot on the
medium) leaves the identity unchanged; ``lab sweep --verify full`` and the
``manifest_intact`` check re-hash regardless of stamps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

from resources.storage.base import (
    CHEAP,
    FULL,
    FileProblem,
    Manifest,
    StorageError,
    iter_files,
    sha256_file,
)

log = logging.getLogger(__name__)

CACHE_ENV = "LAB_CACHE_DIR"
# A file changed less than this long before it was hashed is not remembered (see above).
RACY_NS = 2 * 10**9

Identity = tuple[int, int, int, int, int]


def default_cache_dir() -> Path:
    """`$LAB_CACHE_DIR`, else `lab-cache` under the system temp dir."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "lab-cache")


def identity(st: os.stat_result) -> Identity:
    """What must stay equal for a file to still hold the bytes it was hashed with."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev)


class HashStamps:
    """The remembered sha256s of one directory's files, kept in a sidecar JSON file."""

    def __init__(self, directory: Path, stamp_root: Path | None = None):
        self.directory = Path(directory).resolve()
        root = (stamp_root or default_cache_dir()) / "verified"
        key = hashlib.sha256(str(self.directory).encode()).hexdigest()[:32]
        self.sidecar = root / f"{key}.json"
        self._stamps: dict[str, tuple[Identity, str]] = {}
        self._dirty = False
        try:
            doc = json.loads(self.sidecar.read_text())
            if doc.get("dir") == str(self.directory):
                for rel, (ident, sha) in doc["files"].items():
                    self._stamps[rel] = (tuple(ident), str(sha))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no sidecar or an unreadable one: everything is hashed afresh

    def sha256(self, rel: str, st: os.stat_result, *, trust: bool = True) -> str:
        """The sha256 of `rel` (stat'ed as `st`): remembered if unchanged, else hashed now.

        With `trust=False` the file is hashed regardless (and the result remembered).
        """
        ident = identity(st)
        hit = self._stamps.get(rel)
        if trust and hit is not None and hit[0] == ident:
            return hit[1]
        path = self.directory / rel
        sha = sha256_file(path)
        try:
            after = identity(path.stat())
        except OSError:
            after = None
        if after == ident and time.time_ns() - st.st_ctime_ns > RACY_NS:
            self._stamps[rel] = (ident, sha)
            self._dirty = True
        elif self._stamps.pop(rel, None) is not None:
            self._dirty = True
        return sha

    def save(self) -> None:
        """Write the sidecar if anything changed; failures only cost re-hashing later."""
        if not self._dirty:
            return
        doc = {
            "dir": str(self.directory),
            "files": {rel: [list(i), sha] for rel, (i, sha) in sorted(self._stamps.items())},
        }
        try:
            self.sidecar.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.sidecar.with_name(f".{self.sidecar.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.sidecar)
            self._dirty = False
        except OSError as e:
            log.debug("could not write hash stamps %s: %s", self.sidecar, e)


def check_dir(
    d: Path,
    manifest: Manifest,
    *,
    level: str = CHEAP,
    trust_stamps: bool = True,
    stamp_root: Path | None = None,
) -> list[FileProblem]:
    """How the files under `d` disagree with `manifest` (the manifest file itself aside).

    `CHEAP`: missing files, stray files, sizes (stat calls only). `FULL`: and sha256,
    through `HashStamps` unless `trust_stamps` is False (then every file is re-hashed).
    """
    if level not in (CHEAP, FULL):
        raise StorageError(f"unknown check level {level!r} (expected {CHEAP!r} or {FULL!r})")
    d = Path(d)
    present = {p.relative_to(d).as_posix(): p for p in iter_files(d)} if d.is_dir() else {}
    stamps = HashStamps(d, stamp_root) if level == FULL else None
    problems: list[FileProblem] = []
    for f in manifest.files:
        p = present.pop(f.path, None)
        try:
            st = p.stat() if p is not None else None
        except OSError:
            st = None
        if st is None:
            problems.append(FileProblem(f.path, "missing", expected=f.size))
        elif st.st_size != f.size:
            problems.append(FileProblem(f.path, "size", expected=f.size, found=st.st_size))
        elif stamps is not None:
            sha = stamps.sha256(f.path, st, trust=trust_stamps)
            if sha != f.sha256:
                problems.append(FileProblem(f.path, "sha256", expected=f.sha256, found=sha))
    for rel, p in sorted(present.items()):
        try:
            size: int | None = p.stat().st_size
        except OSError:
            continue  # gone meanwhile: not there, so not stray
        problems.append(FileProblem(rel, "stray", found=size))
    if stamps is not None:
        stamps.save()
    return problems
