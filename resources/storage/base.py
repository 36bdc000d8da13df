"""Artifact storage, the bottom layer: what a stored partition is, whatever holds it.

Layout: ``<root>/<experiment>/<asset>/<partition key>/``. A partition is complete
only when its ``manifest.json`` (file list, sizes, sha256) exists; the manifest is
written last, so a crash mid-write leaves a partition that reads as missing,
never as half-there.

This module holds what every backend shares: the ``ArtifactStore`` interface, the
``Manifest`` format, the errors, sha256 helpers and partition-folder naming. It imports
no backend; the backends (``resources.storage.local``, ``resources.storage.gcs``) build
on it, and ``resources.storage.open.open_store`` picks one from a storage root.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

MANIFEST_NAME = "manifest.json"
UNPARTITIONED = "all"
_CHUNK = 1 << 20


class StorageError(RuntimeError):
    """A storage operation failed; the message names the location at fault."""


class IncompletePartitionError(StorageError):
    """A partition was asked for that storage does not hold complete."""


class ConcurrentWriteError(StorageError):
    """Another writer committed (or is committing) the same partition; this commit lost.

    Its files were discarded and the partition holds the other writer's complete version:
    re-run to replace it.
    """


# How hard a stored partition is checked against its manifest (`ArtifactStore.check`).
CHEAP = "cheap"  # file list and sizes, stray files: stat calls only, safe every tick
FULL = "full"  # and every file's sha256: reads every byte


@dataclass(frozen=True)
class FileProblem:
    """One way a stored file disagrees with its partition's manifest.

    `kind` is `missing` (in the manifest, not on disk), `stray` (on disk, not in the
    manifest), `size` or `sha256` (or, for GCS objects, `generation` or `crc32c`; `error`
    when the files could not be read at all); `expected` is the manifest's value, `found`
    what is there.
    """

    path: str
    kind: str
    expected: int | str | None = None
    found: int | str | None = None

    def __str__(self) -> str:
        if self.kind == "missing":
            return f"{self.path} missing"
        if self.kind == "stray":
            return f"{self.path} stray file ({self.found} bytes, not in the manifest)"
        if self.kind == "error":
            return f"{self.path}: {self.found}"
        if self.kind == "size":
            return f"{self.path} size {self.found} != {self.expected} (manifest)"
        return f"{self.path} {self.kind} {self.found} != {self.expected} (manifest)"

    @property
    def short(self) -> str:
        """One line without the hashes, for the sweep's reasons."""
        if self.kind == "sha256":
            return f"{self.path} sha256 mismatch"
        return str(self)


class IntegrityError(StorageError):
    """A stored partition's files do not match its manifest: corrupt, truncated, stray.

    Raised when an input is read, before downstream code sees the files: a flipped byte
    would otherwise be computed on silently, and a truncated file would fail later with
    a parser's error that names neither the partition nor the cause.
    """

    def __init__(self, asset: str, partition: str | None, where: str, problems: list[FileProblem]):
        self.asset = asset
        self.partition = partition
        self.where = where
        self.problems = list(problems)
        part = f"[{partition}]" if partition is not None else ""
        super().__init__(
            f"{asset}{part}: stored files do not match the manifest at {where}: "
            + "; ".join(str(p) for p in self.problems)
        )


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


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def partition_dirname(partition: str | None) -> str:
    """The directory name of a partition: `all` for unpartitioned, else its key made
    shell-safe and reversible. Dagster's `|` between dimensions becomes `+`
    (`tiny-llama|dpo-arith-r8-s0` -> `tiny-llama+dpo-arith-r8-s0`); any other character
    outside ``[A-Za-z0-9._-]`` (and a leading dot) becomes `%XX`, as in a URL, so the
    name needs no quoting in a shell and `partition_from_dirname` gives the key back."""
    if partition is None:
        return UNPARTITIONED
    if not partition or "\0" in partition:
        raise StorageError(f"partition key {partition!r} cannot name a directory")
    out = []
    for i, ch in enumerate(partition):
        if ch == "|":
            out.append("+")
        elif ch in _PLAIN and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.append("".join(f"%{b:02X}" for b in ch.encode()))
    return "".join(out)


def partition_label(partition: str | None) -> str:
    """A partition as messages and manifests name it: its key, or `all` for unpartitioned."""
    return UNPARTITIONED if partition is None else partition


def partition_from_dirname(name: str) -> str:
    """The partition key a directory name (`partition_dirname`) stands for."""
    return unquote(name.replace("+", "|"), errors="strict")


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

    @abstractmethod
    def check(
        self,
        asset: str,
        partition: str | None,
        manifest: Manifest | None = None,
        *,
        level: str = CHEAP,
    ) -> list[FileProblem]:
        """How the stored partition disagrees with `manifest` (default: its own), at `level`.

        `CHEAP` compares file lists and sizes and finds stray files without reading any
        content, so it can run on every automation tick; `FULL` also re-hashes every file.
        A partition without a manifest has nothing to check against: empty.
        """

    @abstractmethod
    def verified_path(self, asset: str, partition: str | None) -> Path:
        """`local_path`, with every file checked against the manifest (size and sha256).

        Raises `IntegrityError` on any mismatch, missing or stray file. Hashes are
        remembered by file identity (see `resources.storage.integrity`), so an untouched
        file is hashed once, not on every read.
        """

    def remove_leftovers(self) -> list:
        """Delete what a writer that died mid-commit left beside the partitions; returns it.
        (Nothing to do where a commit leaves nothing behind, e.g. GCS.)"""
        return []

    def is_complete(self, asset: str, partition: str | None) -> bool:
        return self.read_manifest(asset, partition) is not None


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
