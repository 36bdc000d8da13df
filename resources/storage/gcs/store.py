"""The GCS backend of the artifact store: partitions as files in a bucket, manifest last.

``open_store("gs://bucket/prefix", experiment)`` returns a ``GCSArtifactStore``. Each
partition lives under ``gs://bucket/prefix/<experiment>/<asset>/<partition>/``, the
same path as on disk, and is one ``GCSManifestDir``: committed with the safe-write
protocol of ``resources.storage.gcs.manifest_dir``, read through the verified local
cache of ``resources.storage.gcs.cache``, moved by ``resources.storage.gcs.session``.
This module maps the ``ArtifactStore`` interface onto those pieces, and adds raw-object
access for files written without a manifest (streamed logs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from resources.remote.protocol import parse_gs_uri
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
    partition_from_dirname,
    partition_label,
    verify_dir,
)
from resources.storage.gcs.cache import default_cache_dir
from resources.storage.gcs.client import CorruptObjectError
from resources.storage.gcs.manifest_dir import COMMIT_DIR_PREFIX, GCSManifestDir, Snapshot
from resources.storage.gcs.session import GCSSession, ProgressFn, StoredObject
from resources.storage.integrity import check_dir


class GCSArtifactStore(ArtifactStore):
    """Artifacts under `gs://bucket/prefix/<experiment>/<asset>/<partition>/`."""

    def __init__(
        self,
        root: str,
        experiment: str,
        *,
        session: GCSSession | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        orphan_grace_s: float = 6 * 3600,
    ):
        super().__init__(root, experiment)
        self.bucket, prefix = parse_gs_uri(self.root)
        self._base = f"{prefix}/{experiment}" if prefix else experiment
        self.session = session or GCSSession()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.orphan_grace_s = orphan_grace_s

    def directory(self, asset: str, partition: str | None) -> GCSManifestDir:
        self.uri(asset, partition)  # validates both names
        return GCSManifestDir(
            self.session,
            self.bucket,
            f"{self._base}/{asset}/{partition_dirname(partition)}",
            orphan_grace_s=self.orphan_grace_s,
        )

    def commit(
        self, asset: str, partition: str | None, src: Path, metadata: dict[str, Any] | None = None
    ) -> Manifest:
        return self.directory(asset, partition).commit(
            Path(src), asset=asset, partition=partition_label(partition), metadata=metadata
        )

    def read_manifest(self, asset: str, partition: str | None) -> Manifest | None:
        snap = self.directory(asset, partition).read()
        return snap.manifest if snap else None

    def snapshot(self, asset: str, partition: str | None) -> Snapshot | None:
        """The manifest with its generation and the objects it pins."""
        return self.directory(asset, partition).read()

    def local_path(self, asset: str, partition: str | None) -> Path:
        return self.directory(asset, partition).local_copy(self.cache_dir)

    def download(
        self,
        asset: str,
        partition: str | None,
        dest: Path,
        only: Iterable[str] | None = None,
        progress: ProgressFn | None = None,
    ) -> Manifest:
        """Download the partition's files (or those in `only`) straight under `dest`."""
        d = self.directory(asset, partition)
        snap = d.read()
        if snap is None:
            raise IncompletePartitionError(f"{d.uri}: partition is missing or incomplete")
        d.download(snap, Path(dest), only, progress)
        return snap.manifest

    def list_partitions(self, asset: str) -> list[str]:
        self.uri(asset, None)
        prefix = f"{self._base}/{asset}/"
        keys = set()
        for b in self.session.list(self.bucket, prefix, "name"):
            parts = b.name[len(prefix) :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST_NAME:
                keys.add(partition_from_dirname(parts[0]))
        return sorted(keys)

    def verify(self, asset: str, partition: str | None) -> list[str]:
        """Server-side size/crc32c/generation check of every object, then sha256 of a copy."""
        d = self.directory(asset, partition)
        snap = d.read()
        if snap is None:
            return [f"{d.uri}: no manifest"]
        problems = d.check_objects(snap)
        if problems:
            return problems
        try:
            path = d.local_copy(self.cache_dir)
        except StorageError as e:
            return [str(e)]
        return verify_dir(path, snap.manifest, d.uri)

    def check(
        self,
        asset: str,
        partition: str | None,
        manifest: Manifest | None = None,
        *,
        level: str = CHEAP,
    ) -> list[FileProblem]:
        """See `ArtifactStore.check`; always against the manifest stored now.

        `CHEAP` is server-side only (one listing: each object present at its pinned
        generation, size and crc32c, and no stray objects in the commit directory);
        `FULL` also sha256-checks a local copy (downloaded if the cache has none).
        """
        d = self.directory(asset, partition)
        snap = d.read()
        if snap is None:
            return []
        problems = object_problems(d, snap)
        if problems or level == CHEAP:
            return problems
        try:
            path = d.local_copy(self.cache_dir)
        except CorruptObjectError as e:
            return e.problems
        except StorageError as e:
            return [FileProblem(MANIFEST_NAME, "error", found=str(e))]
        return check_dir(
            path,
            snap.manifest,
            level=FULL,
            trust_stamps=False,
            stamp_root=self.cache_dir or default_cache_dir(),
        )

    def verified_path(self, asset: str, partition: str | None) -> Path:
        """The cached copy: sha256-checked when downloaded, and when reused (see `local_copy`).
        Stored objects that do not match the manifest raise `IntegrityError`."""
        d = self.directory(asset, partition)
        try:
            return d.local_copy(self.cache_dir)
        except CorruptObjectError as e:
            raise IntegrityError(asset, partition, d.uri, e.problems) from e

    # -- raw objects (streamed logs and other files written without a manifest) ----

    def list_objects(self, rel_prefix: str) -> list[StoredObject]:
        """Objects under `<root>/<experiment>/<rel_prefix>/`, named relative to it."""
        prefix = f"{self._base}/{rel_prefix.strip('/')}/"
        return [
            StoredObject(b.name[len(prefix) :], int(b.size or 0), b.crc32c, int(b.generation))
            for b in self.session.list(self.bucket, prefix, "name,size,crc32c,generation")
        ]

    def download_object(
        self, rel_path: str, dest: Path, *, size: int = 0, generation: int | None = None
    ) -> None:
        """Download `<root>/<experiment>/<rel_path>` to the file `dest` (crc32c-checked)."""
        name = f"{self._base}/{rel_path.strip('/')}"
        self.session.download(self.bucket, [(name, generation, size, Path(dest))])


def object_problems(d: GCSManifestDir, snap: Snapshot) -> list[FileProblem]:
    """The bucket's objects against the snapshot: missing, generation, size, crc32c, stray."""
    stored = d.stored_objects(snap)
    problems = []
    for f in snap.manifest.files:
        o = stored.pop(f.path, None)
        ref = snap.objects.get(f.path)
        if o is None:
            problems.append(FileProblem(f.path, "missing", expected=f.size))
        elif ref and ref.generation and o.generation != ref.generation:
            problems.append(
                FileProblem(f.path, "generation", expected=ref.generation, found=o.generation)
            )
        elif o.size != f.size:
            problems.append(FileProblem(f.path, "size", expected=f.size, found=o.size))
        elif ref and ref.crc32c and o.crc32c != ref.crc32c:
            problems.append(FileProblem(f.path, "crc32c", expected=ref.crc32c, found=o.crc32c))
    for rel, o in sorted(stored.items()):
        # The flat (rsync-ed) layout shares its prefix with the manifest and commit dirs.
        if snap.commit is None and (rel == MANIFEST_NAME or rel.startswith(COMMIT_DIR_PREFIX)):
            continue
        problems.append(FileProblem(rel, "stray", found=o.size))
    return problems
