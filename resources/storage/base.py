"""Artifact storage: every asset partition is a directory of real files plus a manifest.

Layout: ``<root>/<experiment>/<asset>/<partition key>/``. A partition is complete
only when its ``manifest.json`` (file list, sizes, sha256) exists; the manifest is
written last, so a crash mid-write leaves a partition that reads as missing,
never as half-there. ``open_store`` picks the backend from the root: a local path
here, ``gs://bucket/prefix`` through the GCS backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
UNPARTITIONED = "all"
_CHUNK = 1 << 20


class StorageError(RuntimeError):
    """A storage operation failed; the message names the location at fault."""


class IncompletePartitionError(StorageError):
    """A partition was asked for that storage does not hold complete."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    asset: str
    partition: str
    files: tuple[FileEntry, ...]
    created_at: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = 1
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            d = json.loads(text)
            files = tuple(FileEntry(**f) for f in d["files"])
            return cls(
                asset=d["asset"],
                partition=d["partition"],
                files=files,
                created_at=float(d["created_at"]),
                metadata=dict(d.get("metadata") or {}),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"{where}: unreadable manifest: {e}") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def iter_files(src: Path) -> Iterator[Path]:
    """Regular files under `src`, sorted, excluding any stale manifest."""
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.relative_to(src).as_posix() != MANIFEST_NAME:
            yield p


def scan_dir(src: Path) -> tuple[FileEntry, ...]:
    return tuple(
        FileEntry(p.relative_to(src).as_posix(), p.stat().st_size, sha256_file(p))
        for p in iter_files(src)
    )


def partition_dirname(partition: str | None) -> str:
    """The directory name of a partition: its key, verbatim, or `all` for unpartitioned."""
    if partition is None:
        return UNPARTITIONED
    if not partition or "/" in partition or partition in {".", ".."} or "\0" in partition:
        raise StorageError(f"partition key {partition!r} cannot name a directory")
    return partition


_ASSET = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ArtifactStore(ABC):
    """One experiment's artifacts under one storage root."""

    def __init__(self, root: str, experiment: str):
        self.root = root.rstrip("/")
        self.experiment = experiment

    def uri(self, asset: str, partition: str | None) -> str:
        if not _ASSET.match(asset):
            raise StorageError(f"asset name {asset!r} cannot name a directory")
        return f"{self.root}/{self.experiment}/{asset}/{partition_dirname(partition)}"

    @abstractmethod
    def commit(
        self, asset: str, partition: str | None, src: Path, metadata: dict[str, Any] | None = None
    ) -> Manifest:
        """Store the files under `src` as this partition, manifest last; replaces any old one."""

    @abstractmethod
    def read_manifest(self, asset: str, partition: str | None) -> Manifest | None:
        """The partition's manifest, or None when it is missing (the partition is incomplete)."""

    @abstractmethod
    def local_path(self, asset: str, partition: str | None) -> Path:
        """A local directory holding the partition's files (read-only for the caller)."""

    @abstractmethod
    def list_partitions(self, asset: str) -> list[str]:
        """Keys of this asset's partitions that have a manifest."""

    @abstractmethod
    def verify(self, asset: str, partition: str | None) -> list[str]:
        """Problems found re-checking every file against the manifest (empty: intact)."""

    def is_complete(self, asset: str, partition: str | None) -> bool:
        return self.read_manifest(asset, partition) is not None


class LocalArtifactStore(ArtifactStore):
    """A local directory tree. Writes stage in a sibling directory and swap in by rename."""

    def _dir(self, asset: str, partition: str | None) -> Path:
        return Path(self.uri(asset, partition))

    def commit(
        self, asset: str, partition: str | None, src: Path, metadata: dict[str, Any] | None = None
    ) -> Manifest:
        src = Path(src)
        if not src.is_dir():
            raise StorageError(f"{asset}[{partition}]: output {src} is not a directory")
        target = self._dir(asset, partition)
        target.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:8]
        staging = target.parent / f".staging-{token}"
        try:
            shutil.copytree(src, staging, ignore=shutil.ignore_patterns(MANIFEST_NAME))
            manifest = Manifest(
                asset=asset,
                partition=partition_dirname(partition),
                files=scan_dir(staging),
                created_at=time.time(),
                metadata=dict(metadata or {}),
            )
            _write_atomic(staging / MANIFEST_NAME, manifest.to_json())
            old = target.parent / f".old-{token}"
            if target.exists():
                # Drop the old manifest first: between the two renames nothing reads as complete.
                (target / MANIFEST_NAME).unlink(missing_ok=True)
                target.rename(old)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return manifest

    def read_manifest(self, asset: str, partition: str | None) -> Manifest | None:
        path = self._dir(asset, partition) / MANIFEST_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        return Manifest.from_json(text, str(path))

    def local_path(self, asset: str, partition: str | None) -> Path:
        if self.read_manifest(asset, partition) is None:
            raise IncompletePartitionError(
                f"{self.uri(asset, partition)}: partition is missing or incomplete (no manifest)"
            )
        return self._dir(asset, partition)

    def list_partitions(self, asset: str) -> list[str]:
        base = Path(self.root) / self.experiment / asset
        if not base.is_dir():
            return []
        return sorted(
            p.name
            for p in base.iterdir()
            if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
        )

    def verify(self, asset: str, partition: str | None) -> list[str]:
        manifest = self.read_manifest(asset, partition)
        where = self.uri(asset, partition)
        if manifest is None:
            return [f"{where}: no manifest"]
        return verify_dir(self._dir(asset, partition), manifest, where)


def verify_dir(d: Path, manifest: Manifest, where: str) -> list[str]:
    """Check every manifest entry's size and sha256 under `d`."""
    problems = []
    for f in manifest.files:
        p = d / f.path
        if not p.is_file():
            problems.append(f"{where}/{f.path}: missing")
        elif p.stat().st_size != f.size:
            problems.append(f"{where}/{f.path}: size {p.stat().st_size} != {f.size}")
        elif sha256_file(p) != f.sha256:
            problems.append(f"{where}/{f.path}: sha256 mismatch")
    return problems


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_store(root: str, experiment: str) -> ArtifactStore:
    """The store for a storage root: a local path, or `gs://bucket/prefix`."""
    if root.startswith("gs://"):
        try:
            from resources.storage.gcs.store import GCSArtifactStore
        except ImportError as e:  # pragma: no cover - until the GCS backend lands
            raise StorageError(f"{root}: the gs:// backend is not available: {e}") from e
        return GCSArtifactStore(root, experiment)
    return LocalArtifactStore(root, experiment)
