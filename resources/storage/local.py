"""The local backend of the artifact store: a directory tree on this machine.

A commit copies the files into a staging directory beside the partition, writes the
manifest there last, and swaps it in by rename; the old partition loses its manifest
before it is moved aside, so at no point does a half-written partition read as complete.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from resources.storage.base import (
    CHEAP,
    FULL,
    MANIFEST_NAME,
    ArtifactStore,
    FileProblem,
    IncompletePartitionError,
    IntegrityError,
    Manifest,
    StorageError,
    partition_dirname,
    scan_dir,
    verify_dir,
)
from resources.storage.integrity import check_dir


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

    def check(
        self,
        asset: str,
        partition: str | None,
        manifest: Manifest | None = None,
        *,
        level: str = CHEAP,
    ) -> list[FileProblem]:
        """See `ArtifactStore.check`; `FULL` re-hashes every file, remembered hashes aside."""
        manifest = manifest or self.read_manifest(asset, partition)
        if manifest is None:
            return []
        return check_dir(self._dir(asset, partition), manifest, level=level, trust_stamps=False)

    def verified_path(self, asset: str, partition: str | None) -> Path:
        """The partition's directory, checked in full; an untouched file is hashed once."""
        d = self._dir(asset, partition)
        for _ in range(3):
            manifest = self.read_manifest(asset, partition)
            if manifest is None:
                raise IncompletePartitionError(
                    f"{self.uri(asset, partition)}: partition is missing or incomplete "
                    "(no manifest)"
                )
            problems = check_dir(d, manifest, level=FULL)
            if not problems:
                return d
            if self.read_manifest(asset, partition) == manifest:
                raise IntegrityError(asset, partition, str(d), problems)
            # A commit replaced the partition while it was checked: check the new one.
        raise IntegrityError(asset, partition, str(d), problems)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
