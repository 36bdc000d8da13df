"""One GCS directory guarded by a manifest, and the safe-write protocol that commits it.

Both the artifact store (``resources.storage.gcs.store``: one partition per directory)
and the model cache (one snapshot per directory) keep their files this way; the
partition is complete only when its ``manifest.json`` (files, sizes, sha256, the format
of ``resources.storage.base.Manifest``) exists.

Safe-write protocol
-------------------
GCS has no rename, so a partition cannot be staged beside the old one and swapped in.
Instead every commit gets its own *commit directory* and the manifest is the only
pointer to it::

    <partition>/manifest.json                    the pointer; written last
    <partition>/.commit-<UTC time>-<random>/...  one commit's files, never overwritten

1. Read the current manifest and remember its *generation* ``G`` (0 when there is none).
2. Upload every file under a fresh commit directory with ``if_generation_match=0``: no
   object of another commit, or of a concurrent writer, can be replaced. Each upload is
   checked against the local file's crc32c (the client validates per request; sliced
   uploads are checked end to end after ``reload()``), and the new objects' generations
   are recorded.
3. List the commit directory and check that every object is there at the recorded
   generation (nothing swept it while the upload ran).
4. Write ``manifest.json`` with ``if_generation_match=G``. Its ``gcs`` section names the
   commit directory and pins each file's object generation and crc32c; readers fetch
   exactly those generations, so a manifest can never point at bytes some other writer
   replaced. This write is the commit point.
5. Delete the replaced commit's objects (nothing can make that commit current again:
   its manifest generation is gone), and sweep abandoned commit directories once all
   their objects are older than ``orphan_grace_s`` by the server's clock.

A crash or preemption before step 4 leaves the old manifest (or none) in place, so the
partition reads as its previous version or as missing, never half-written; the
abandoned commit directory is swept by a later commit. Two writers racing on one
partition both read ``G``; the first to finish step 4 wins and the other's manifest
write fails its precondition: it deletes its own upload and raises
``ConcurrentWriteError``. A precondition failure caused by a retried request whose first
attempt did succeed is recognised (the object or manifest carries this commit's
checksum or id) and treated as success. Readers that find an object of the manifest
they read gone (a commit replaced it meanwhile) re-read the manifest and start over.

A manifest without a ``gcs`` section (a local tree copied up with ``gcloud storage
rsync``) is read from the flat layout ``<partition>/<file>``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import storage

from resources.storage.base import (
    FULL,
    MANIFEST_NAME,
    FileEntry,
    FileProblem,
    IncompletePartitionError,
    Manifest,
    StorageError,
    iter_files,
)
from resources.storage.gcs.cache import (
    cached_copy_ok,
    default_cache_dir,
    prune_siblings,
    snapshot_key,
    write_verified_marker,
)
from resources.storage.gcs.client import (
    ConcurrentWriteError,
    DownloadCorruptError,
    GCSError,
    ObjectGoneError,
    ObjectOverwrittenError,
    is_gcs_failure,
)
from resources.storage.gcs.session import (
    GCSSession,
    ObjectRef,
    ProgressFn,
    StoredObject,
    file_digests,
)
from resources.storage.integrity import check_dir

log = logging.getLogger(__name__)

COMMIT_DIR_PREFIX = ".commit-"
GCS_SECTION = "gcs"  # the manifest's section this backend owns (ignored by Manifest)


@dataclass(frozen=True)
class Snapshot:
    """One committed version of a directory: its manifest and where its bytes are."""

    manifest: Manifest
    generation: int  # the manifest object's generation
    commit: str | None  # commit directory name; None for the flat (rsync-ed) layout
    objects: dict[str, ObjectRef] = field(default_factory=dict)


class GCSManifestDir:
    """One directory in GCS guarded by a manifest: an artifact partition, a model snapshot.

    Implements the safe-write protocol of this module's docstring.
    """

    def __init__(
        self,
        session: GCSSession,
        bucket: str,
        prefix: str,
        *,
        orphan_grace_s: float = 6 * 3600,
    ):
        self.session = session
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.orphan_grace_s = orphan_grace_s

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.prefix}"

    @property
    def manifest_name(self) -> str:
        return f"{self.prefix}/{MANIFEST_NAME}"

    def _object_name(self, snap: Snapshot, path: str) -> str:
        if snap.commit is None:
            return f"{self.prefix}/{path}"
        return f"{self.prefix}/{snap.commit}/{path}"

    # -- reading -------------------------------------------------------------------

    def read(self) -> Snapshot | None:
        """The committed snapshot, or None when there is no manifest (incomplete/missing)."""
        raw = self._read_raw()
        return None if raw is None else self._parse(*raw)

    def _read_raw(self) -> tuple[str, int] | None:
        blob = self.session.bucket(self.bucket).blob(self.manifest_name)
        try:
            with self.session.guard(self.bucket, self.manifest_name, "reading the manifest"):
                try:
                    data = blob.download_as_bytes(retry=self.session.retry)
                except gexc.NotFound:
                    if self.session.bucket_exists(self.bucket):
                        return None
                    raise
        except UnicodeDecodeError as e:
            raise StorageError(f"{self.uri}/{MANIFEST_NAME}: unreadable manifest: {e}") from e
        return data.decode(), int(blob.generation or 0)

    def _parse(self, text: str, generation: int) -> Snapshot:
        where = f"{self.uri}/{MANIFEST_NAME}"
        manifest = Manifest.from_json(text, where)
        section = json.loads(text).get(GCS_SECTION)
        if section is None:
            return Snapshot(manifest, generation, None, {})
        try:
            objects = {
                path: ObjectRef(int(o["generation"]), o.get("crc32c"))
                for path, o in section["objects"].items()
            }
            commit = str(section["commit"])
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"{where}: unreadable '{GCS_SECTION}' section: {e}") from e
        missing = {f.path for f in manifest.files} - set(objects)
        if missing:
            raise StorageError(f"{where}: no stored object for {sorted(missing)}")
        return Snapshot(manifest, generation, commit, objects)

    def download(
        self,
        snap: Snapshot,
        dest: Path,
        only: Iterable[str] | None = None,
        progress: ProgressFn | None = None,
        stamp_root: Path | None = None,
    ) -> None:
        """Write the snapshot's files (or those named in `only`) under `dest`, sha256-checked
        (`DownloadCorruptError` naming each file that does not match)."""
        wanted = set(only) if only is not None else None
        entries = [f for f in snap.manifest.files if wanted is None or f.path in wanted]
        items = [
            (
                self._object_name(snap, f.path),
                snap.objects[f.path].generation if snap.objects else None,
                f.size,
                dest / f.path,
            )
            for f in entries
        ]
        self.session.download(self.bucket, items, progress)
        problems = check_dir(
            dest,
            Manifest("", "", tuple(entries), 0.0),
            level=FULL,
            trust_stamps=False,
            stamp_root=stamp_root,
        )
        if problems:
            raise DownloadCorruptError(
                f"{self.uri}: downloaded files do not match the manifest: "
                + "; ".join(str(p) for p in problems),
                problems,
            )

    def overwritten(self, snap: Snapshot, gone: ObjectGoneError) -> ObjectOverwrittenError:
        """The error for objects whose pinned generation is gone under an unchanged manifest."""
        stored = self.stored_objects(snap)
        problems = []
        for f in snap.manifest.files:
            ref = snap.objects.get(f.path)
            o = stored.get(f.path)
            if o is None:
                problems.append(FileProblem(f.path, "missing", expected=f.size))
            elif ref and ref.generation and o.generation != ref.generation:
                problems.append(
                    FileProblem(f.path, "generation", expected=ref.generation, found=o.generation)
                )
        return ObjectOverwrittenError(
            f"{self.uri}: committed objects were overwritten or deleted outside the lab (the "
            "manifest still names their old generations): "
            + ("; ".join(str(p) for p in problems) or str(gone))
            + "; the partition is corrupt: `lab sweep` rebuilds it",
            problems,
        )

    def local_copy(self, cache_dir: Path | None = None, *, attempts: int = 4) -> Path:
        """A verified local copy in the cache, downloaded unless an identical one is there.

        A cached copy is reused only if its files still match the manifest's sha256s
        (remembered by file identity, so an untouched copy is not re-hashed); one changed
        locally since its download is downloaded again.
        """
        cache_root = cache_dir or default_cache_dir()
        base = cache_root / "gcs" / self.bucket / self.prefix
        corrupt: DownloadCorruptError | None = None
        for _ in range(attempts):
            snap = self.read()
            if snap is None:
                raise IncompletePartitionError(
                    f"{self.uri}: partition is missing or incomplete (no manifest)"
                )
            target = base / snapshot_key(snap.manifest)
            damaged = False
            if cached_copy_ok(target, snap.manifest):
                problems = check_dir(target, snap.manifest, level=FULL, stamp_root=cache_root)
                if not problems:
                    return target
                damaged = True
                log.warning(
                    "%s: the cached copy %s changed after it was downloaded (%s); "
                    "downloading it again",
                    self.uri,
                    target,
                    "; ".join(p.short for p in problems),
                )
            base.mkdir(parents=True, exist_ok=True)
            staging = base / f".tmp-{uuid.uuid4().hex[:12]}"
            try:
                self.download(snap, staging, stamp_root=cache_root)
                write_verified_marker(staging, snap.manifest)
                try:
                    staging.rename(target)
                except OSError:
                    if damaged or not cached_copy_ok(target, snap.manifest):
                        shutil.rmtree(target, ignore_errors=True)
                        staging.rename(target)
            except ObjectGoneError as e:
                now = self.read()
                if now is not None and now.generation == snap.generation:
                    raise self.overwritten(snap, e) from e  # no new commit: someone else
                log.info("%s changed while reading (%s); reading the new manifest", self.uri, e)
                continue
            except DownloadCorruptError as e:
                corrupt = e  # a flipped byte in flight, most likely: download it again
                log.warning("%s: %s; downloading again", self.uri, e)
                continue
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            prune_siblings(base, keep=target.name)
            return target
        if corrupt is not None:
            raise DownloadCorruptError(
                f"{corrupt} (the same after {attempts} downloads: stored corrupt)", corrupt.problems
            )
        raise GCSError(f"{self.uri}: the partition kept changing while being read; try again")

    def stored_objects(self, snap: Snapshot) -> dict[str, StoredObject]:
        """What the bucket holds for the snapshot's files, by manifest path."""
        root = self.prefix if snap.commit is None else f"{self.prefix}/{snap.commit}"
        out = {}
        for b in self.session.list(self.bucket, root + "/", "name,size,crc32c,generation"):
            rel = b.name[len(root) + 1 :]
            out[rel] = StoredObject(rel, int(b.size or 0), b.crc32c, int(b.generation))
        return out

    def check_objects(self, snap: Snapshot) -> list[str]:
        """Server-side check: every file stored at its pinned generation, size and crc32c."""
        stored = self.stored_objects(snap)
        problems = []
        for f in snap.manifest.files:
            name = f"gs://{self.bucket}/{self._object_name(snap, f.path)}"
            o = stored.get(f.path)
            ref = snap.objects.get(f.path)
            if o is None:
                problems.append(f"{name}: missing")
            elif ref and ref.generation and o.generation != ref.generation:
                problems.append(f"{name}: generation {o.generation} != {ref.generation}")
            elif o.size != f.size:
                problems.append(f"{name}: size {o.size} != {f.size}")
            elif ref and ref.crc32c and o.crc32c != ref.crc32c:
                problems.append(f"{name}: crc32c {o.crc32c} != {ref.crc32c}")
        return problems

    # -- writing -------------------------------------------------------------------

    def commit(
        self,
        src: Path,
        *,
        asset: str,
        partition: str,
        metadata: dict[str, Any] | None = None,
        progress: ProgressFn | None = None,
    ) -> Manifest:
        """Store the files under `src` as the new version, manifest last (see module doc)."""
        src = Path(src)
        if not src.is_dir():
            raise StorageError(f"{self.uri}: output {src} is not a directory")
        local = []
        for p in iter_files(src):
            sha, crc = file_digests(p)
            local.append((p, p.relative_to(src).as_posix(), sha, crc))
        raw = self._read_raw()
        expected = raw[1] if raw else 0
        try:
            previous = self._parse(*raw) if raw else None
        except StorageError as e:
            log.warning("%s: replacing an unreadable manifest: %s", self.uri, e)
            previous = None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        commit = f"{COMMIT_DIR_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}"
        croot = f"{self.prefix}/{commit}"
        published = False
        try:
            refs = self.session.upload(
                self.bucket, [(p, f"{croot}/{rel}", crc) for p, rel, _, crc in local], progress
            )
            objects = {rel: refs[f"{croot}/{rel}"] for _, rel, _, _ in local}
            self._check_upload(croot, objects)
            manifest = Manifest(
                asset=asset,
                partition=partition,
                files=tuple(FileEntry(rel, p.stat().st_size, sha) for p, rel, sha, _ in local),
                created_at=time.time(),
                metadata=dict(metadata or {}),
            )
            written = self._publish(manifest, commit, objects, expected)
            published = True
        finally:
            if not published:
                self._discard(commit)
        self._sweep(keep=commit, replaced=previous, now=written)
        return manifest

    def _discard(self, commit: str) -> None:
        """Delete an unpublished commit's objects, unless the live manifest names it."""
        try:
            if self._references(commit):
                return
            croot = f"{self.prefix}/{commit}/"
            self.session.delete_quietly(
                self.bucket, ((b.name, b.generation) for b in self._list(croot))
            )
        except Exception as e:  # the abandoned commit is swept later; keep the real error
            log.warning("%s: could not discard unpublished %s: %s", self.uri, commit, e)

    def _list(self, prefix: str) -> list[storage.Blob]:
        return list(self.session.list(self.bucket, prefix, "name,generation,timeCreated"))

    def _check_upload(self, croot: str, objects: dict[str, ObjectRef]) -> None:
        stored = {b.name[len(croot) + 1 :]: int(b.generation) for b in self._list(croot + "/")}
        bad = [rel for rel, ref in objects.items() if stored.get(rel) != ref.generation]
        if bad:
            raise GCSError(
                f"gs://{self.bucket}/{croot}: uploaded objects vanished or changed before the "
                f"manifest was written: {bad[:5]}"
            )

    def _publish(
        self, manifest: Manifest, commit: str, objects: dict[str, ObjectRef], expected: int
    ) -> datetime | None:
        """Write the manifest iff its generation is still `expected`; the commit point."""
        doc = json.loads(manifest.to_json())
        doc[GCS_SECTION] = {
            "commit": commit,
            "objects": {
                rel: {"generation": ref.generation, "crc32c": ref.crc32c}
                for rel, ref in sorted(objects.items())
            },
        }
        blob = self.session.bucket(self.bucket).blob(self.manifest_name)
        blob.cache_control = "no-store"
        try:
            blob.upload_from_string(
                json.dumps(doc, indent=1, sort_keys=True),
                content_type="application/json",
                if_generation_match=expected,
                checksum="crc32c",
                retry=self.session.conditional_retry,
            )
        except gexc.PreconditionFailed as e:
            current = self.read()
            if current is not None and current.commit == commit:
                return None  # our own write, answered by a retry: it landed
            now = f"generation {current.generation}" if current else "deleted"
            raise ConcurrentWriteError(
                f"{self.uri}: another writer committed this partition while this one was "
                f"uploading (manifest expected at generation {expected or 'none'}, now "
                f"{now}); this writer's files were discarded. Re-run to replace it."
            ) from e
        except Exception as e:
            if not is_gcs_failure(e):
                raise
            if self._references(commit, strict=True):
                return None  # the write landed though its answer was lost
            raise self.session.error(
                e, self.bucket, self.manifest_name, "writing the manifest"
            ) from e
        return blob.time_created

    def _references(self, commit: str, *, strict: bool = False) -> bool:
        """Whether the live manifest names `commit`.

        When the manifest cannot be read the answer is True (so nothing is deleted),
        or False with `strict` (so a failure is not mistaken for a success).
        """
        try:
            current = self.read()
        except Exception:
            return not strict
        return current is not None and current.commit == commit

    def _sweep(self, keep: str, replaced: Snapshot | None, now: datetime | None) -> None:
        """Delete the replaced commit now and abandoned commits past the grace period."""
        try:
            listed = self._list(self.prefix + "/")
        except Exception as e:
            log.warning("%s: could not list for cleanup: %s", self.uri, e)
            return
        groups: dict[str, list[storage.Blob]] = {}
        for b in listed:
            head = b.name[len(self.prefix) + 1 :].split("/", 1)[0]
            if head.startswith(COMMIT_DIR_PREFIX) and head != keep:
                groups.setdefault(head, []).append(b)
        doomed: list[tuple[str, int | None]] = []
        if replaced is not None and replaced.commit is None:
            doomed += [(f"{self.prefix}/{f.path}", None) for f in replaced.manifest.files]
        for commit, blobs in groups.items():
            if replaced is not None and commit == replaced.commit:
                doomed += [(b.name, b.generation) for b in blobs]
            elif now is not None and all(
                b.time_created is not None
                and (now - b.time_created).total_seconds() > self.orphan_grace_s
                for b in blobs
            ):
                doomed += [(b.name, b.generation) for b in blobs]
        n = self.session.delete_quietly(self.bucket, doomed)
        if n:
            log.info("%s: deleted %d objects of replaced or abandoned commits", self.uri, n)
