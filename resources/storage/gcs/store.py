"""The GCS backend of the artifact store: partitions as files in a bucket, manifest last.

``open_store("gs://bucket/prefix", experiment)`` returns a ``GCSArtifactStore``. Each
partition lives under ``gs://bucket/prefix/<experiment>/<asset>/<partition>/``, the
same path as on disk, and is complete only when its ``manifest.json`` (files, sizes,
sha256, the format of ``resources.storage.base.Manifest``) exists there.

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

Reading: ``local_path`` downloads a partition into a local cache directory
(``$LAB_CACHE_DIR``, default ``<tmp>/lab-cache``), keyed by the manifest's sha256s, so
a replaced partition is downloaded again and an unchanged one is reused. Downloads are
checked by crc32c (per request, or combined over slices) and then by sha256 against the
manifest. A manifest without a ``gcs`` section (a local tree copied up with
``gcloud storage rsync``) is read from the flat layout ``<partition>/<file>``.

Transfers: many files go through ``transfer_manager.upload_many``/``download_many``;
files above ``TransferConfig.sliced_threshold`` through ``upload_chunks_concurrently``
(the XML multipart API) and ``download_chunks_concurrently``, in threads by default
(processes fork, which is unsafe inside a threaded host such as a Dagster run).
Emulators lack the XML multipart API, so sliced *uploads* are on by default only
against ``*.googleapis.com``. Transient errors (429, 5xx, dropped connections) are
retried with back-off; calls that are only idempotent under a generation precondition
use the conditional policy (``resources.storage.gcs.client``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import google_crc32c
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import storage
from google.cloud.storage import transfer_manager as tm

from resources.remote.protocol import parse_gs_uri
from resources.storage.base import (
    MANIFEST_NAME,
    ArtifactStore,
    FileEntry,
    IncompletePartitionError,
    Manifest,
    StorageError,
    iter_files,
    partition_dirname,
    verify_dir,
)
from resources.storage.gcs.client import (
    ConcurrentWriteError,
    GCSError,
    if_generation_specified,
    is_gcs_failure,
    make_client,
    retry_policy,
    translate,
)

log = logging.getLogger(__name__)

COMMIT_DIR_PREFIX = ".commit-"
CACHE_ENV = "LAB_CACHE_DIR"
GCS_SECTION = "gcs"  # the manifest's section this backend owns (ignored by Manifest)
_CHUNK = 1 << 20
_STAMP_AGE_NS = 10 * 10**9  # cached files get an mtime this far in the past (see _pin_mtimes)

ProgressFn = Callable[[int], None]


class ObjectGoneError(GCSError):
    """An object the manifest names is gone: a newer commit replaced the partition."""


@dataclass(frozen=True)
class TransferConfig:
    """How files move. Sizes in bytes; the defaults suit model weights on real GCS."""

    sliced_threshold: int = 64 << 20  # files at least this big move in parallel slices
    chunk_size: int = 32 << 20
    max_workers: int = 8
    worker_type: str = tm.THREAD  # or tm.PROCESS (forks; avoid inside threaded hosts)
    sliced_upload: bool | None = None  # None: on, except against an emulator


@dataclass(frozen=True)
class ObjectRef:
    """A stored object as the manifest pins it."""

    generation: int | None
    crc32c: str | None


@dataclass(frozen=True)
class Snapshot:
    """One committed version of a directory: its manifest and where its bytes are."""

    manifest: Manifest
    generation: int  # the manifest object's generation
    commit: str | None  # commit directory name; None for the flat (rsync-ed) layout
    objects: dict[str, ObjectRef] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredObject:
    """An object listed under a prefix, named relative to that prefix."""

    path: str
    size: int
    crc32c: str | None
    generation: int


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256 hex, crc32c base64 as GCS reports it) of a local file, in one pass."""
    h = hashlib.sha256()
    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            c.update(chunk)
    return h.hexdigest(), base64.b64encode(c.digest()).decode()


def crc32c_file(path: Path) -> str:
    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            c.update(chunk)
    return base64.b64encode(c.digest()).decode()


def default_cache_dir() -> Path:
    """`$LAB_CACHE_DIR`, else `lab-cache` under the system temp dir."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "lab-cache")


def snapshot_key(manifest: Manifest) -> str:
    """Content key of a manifest's files: equal keys mean byte-identical directories."""
    h = hashlib.sha256()
    for f in sorted(manifest.files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return h.hexdigest()[:20]


class GCSSession:
    """The client, retry policy and transfer settings every GCS directory shares.

    The client is made on first use, so a session (and the stores holding one) can be
    built and pickled where no credentials exist.
    """

    def __init__(
        self,
        client: storage.Client | None = None,
        *,
        project: str | None = None,
        endpoint: str | None = None,
        retry: Retry | None = None,
        transfer: TransferConfig | None = None,
    ):
        self._client = client
        self._project = project
        self._endpoint = endpoint
        self.retry = retry or retry_policy()
        self.conditional_retry = if_generation_specified(self.retry)
        self.transfer = transfer or TransferConfig()
        self._buckets_seen: set[str] = set()

    @property
    def client(self) -> storage.Client:
        if self._client is None:
            self._client = make_client(self._project, endpoint=self._endpoint)
        return self._client

    @property
    def sliced_upload(self) -> bool:
        """Sliced uploads need the XML multipart API: real GCS has it, emulators do not."""
        if self.transfer.sliced_upload is not None:
            return self.transfer.sliced_upload
        host = urllib.parse.urlsplit(self.client.api_endpoint or "").hostname or ""
        return host.endswith("googleapis.com")

    def bucket(self, name: str) -> storage.Bucket:
        return self.client.bucket(name)

    def bucket_exists(self, bucket: str) -> bool:
        """Whether the bucket exists; True when the credentials cannot tell (403)."""
        if bucket in self._buckets_seen:
            return True
        try:
            next(iter(self.client.list_blobs(bucket, max_results=1, retry=self.retry)), None)
        except gexc.NotFound:
            return False
        except gexc.GoogleAPIError:
            return True
        self._buckets_seen.add(bucket)
        return True

    def error(self, e: BaseException, bucket: str, name: str, action: str) -> GCSError:
        """`translate`, finding out first whether a 404 means the bucket is missing."""
        missing = isinstance(e, gexc.NotFound) and not self.bucket_exists(bucket)
        return translate(e, bucket, name, action, bucket_missing=missing)

    @contextmanager
    def guard(self, bucket: str, name: str, action: str) -> Iterator[None]:
        """Re-raise GCS failures inside the block as a `GCSError` naming gs://bucket/name."""
        try:
            yield
        except Exception as e:
            if is_gcs_failure(e):
                raise self.error(e, bucket, name, action) from e
            raise

    def list(self, bucket: str, prefix: str, fields: str) -> list[storage.Blob]:
        """Every object under `prefix` (all pages), with only `fields` filled in."""
        with self.guard(bucket, prefix, "listing"):
            return list(
                self.client.list_blobs(
                    bucket,
                    prefix=prefix,
                    fields=f"items({fields}),nextPageToken",
                    retry=self.retry,
                )
            )

    # -- transfers ---------------------------------------------------------------

    def upload(
        self,
        bucket: str,
        items: list[tuple[Path, str, str]],
        progress: ProgressFn | None = None,
    ) -> dict[str, ObjectRef]:
        """Upload (local path, object name, local crc32c) triples as new objects.

        Every object is created with `if_generation_match=0` (sliced ones under names no
        one else uses) and its stored crc32c is checked against the local one.
        """
        cfg = self.transfer
        bkt = self.bucket(bucket)
        done: dict[str, ObjectRef] = {}
        sliced = self.sliced_upload
        small = [i for i in items if not sliced or i[0].stat().st_size < cfg.sliced_threshold]
        big = [i for i in items if i not in small]
        for batch in _batches(small, cfg.max_workers * 4):
            pairs = [(str(path), bkt.blob(name)) for path, name, _ in batch]
            results = tm.upload_many(
                pairs,
                upload_kwargs={
                    "if_generation_match": 0,
                    "retry": self.conditional_retry,
                    "checksum": "crc32c",
                },
                worker_type=tm.THREAD,
                max_workers=cfg.max_workers,
                raise_exception=False,
            )
            for (path, name, crc), (_, blob), result in zip(batch, pairs, results, strict=True):
                if isinstance(result, gexc.PreconditionFailed):
                    # A retried request whose first attempt had landed: same bytes, fine.
                    self._reload(blob, bucket, "checking an upload that was retried")
                    if blob.crc32c != crc:
                        raise translate(result, bucket, name, "uploading")
                elif isinstance(result, BaseException):
                    raise self.error(result, bucket, name, "uploading")
                done[name] = self._checked_ref(blob, bucket, crc, path)
                if progress:
                    progress(path.stat().st_size)
        for path, name, crc in big:
            blob = bkt.blob(name)
            with self.guard(bucket, name, "uploading in parallel slices"):
                tm.upload_chunks_concurrently(
                    str(path),
                    blob,
                    chunk_size=cfg.chunk_size,
                    worker_type=cfg.worker_type,
                    max_workers=cfg.max_workers,
                    checksum="crc32c",
                    retry=self.retry,
                )
            self._reload(blob, bucket, "checking a sliced upload")
            done[name] = self._checked_ref(blob, bucket, crc, path)
            if progress:
                progress(path.stat().st_size)
        return done

    def _reload(self, blob: storage.Blob, bucket: str, action: str) -> None:
        with self.guard(bucket, blob.name, action):
            blob.reload(retry=self.retry)

    @staticmethod
    def _checked_ref(blob: storage.Blob, bucket: str, crc: str, path: Path) -> ObjectRef:
        size = path.stat().st_size
        if blob.crc32c != crc or (blob.size is not None and blob.size != size):
            raise GCSError(
                f"gs://{bucket}/{blob.name}: stored object (crc32c {blob.crc32c}, "
                f"{blob.size} bytes) does not match {path} (crc32c {crc}, {size} bytes)"
            )
        return ObjectRef(int(blob.generation), blob.crc32c)

    def download(
        self,
        bucket: str,
        items: list[tuple[str, int | None, int, Path]],
        progress: ProgressFn | None = None,
    ) -> None:
        """Download (object name, generation or None, size, local path) quadruples.

        Pinned generations are fetched exactly; a 404 on one raises `ObjectGoneError`.
        Each file is crc32c-checked by the client (combined over slices for big ones).
        """
        cfg = self.transfer
        bkt = self.bucket(bucket)
        for _, _, _, dest in items:
            dest.parent.mkdir(parents=True, exist_ok=True)
        small = [i for i in items if i[2] < cfg.sliced_threshold]
        big = [i for i in items if i[2] >= cfg.sliced_threshold]
        for batch in _batches(small, cfg.max_workers * 4):
            pairs = [(bkt.blob(name, generation=gen), str(dest)) for name, gen, _, dest in batch]
            results = tm.download_many(
                pairs,
                download_kwargs={"retry": self.retry, "checksum": "crc32c"},
                worker_type=tm.THREAD,
                max_workers=cfg.max_workers,
                raise_exception=False,
            )
            for (name, gen, size, _), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    raise self._download_error(result, bucket, name, gen)
                if progress:
                    progress(size)
        for name, gen, size, dest in big:
            blob = bkt.blob(name, generation=gen)
            try:
                tm.download_chunks_concurrently(
                    blob,
                    str(dest),
                    chunk_size=cfg.chunk_size,
                    download_kwargs={"retry": self.retry},
                    worker_type=cfg.worker_type,
                    max_workers=cfg.max_workers,
                    crc32c_checksum=True,
                )
            except Exception as e:
                if not is_gcs_failure(e):
                    raise
                raise self._download_error(e, bucket, name, gen) from e
            if progress:
                progress(size)

    def _download_error(
        self, e: BaseException, bucket: str, name: str, gen: int | None
    ) -> GCSError:
        if isinstance(e, gexc.NotFound) and self.bucket_exists(bucket):
            pinned = f" at generation {gen}" if gen else ""
            return ObjectGoneError(f"gs://{bucket}/{name}{pinned}: object is gone (404)")
        return self.error(e, bucket, name, "downloading")

    def delete_quietly(self, bucket: str, objects: Iterable[tuple[str, int | None]]) -> int:
        """Delete (name, generation) pairs in parallel; failures are logged, not raised."""
        bkt = self.bucket(bucket)

        def one(item: tuple[str, int | None]) -> int:
            name, gen = item
            try:
                bkt.blob(name).delete(if_generation_match=gen, retry=self.conditional_retry)
                return 1
            except (gexc.NotFound, gexc.PreconditionFailed):
                return 0
            except Exception as e:  # cleanup must never fail a commit that succeeded
                log.warning("could not delete gs://%s/%s: %s", bucket, name, e)
                return 0

        objects = list(objects)
        if not objects:
            return 0
        with ThreadPoolExecutor(max_workers=self.transfer.max_workers) as pool:
            return sum(pool.map(one, objects))


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


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
    ) -> None:
        """Write the snapshot's files (or those named in `only`) under `dest`, sha256-checked."""
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
        problems = verify_dir(dest, Manifest("", "", tuple(entries), 0.0), self.uri)
        if problems:
            raise GCSError("downloaded files do not match the manifest: " + "; ".join(problems))

    def local_copy(self, cache_dir: Path | None = None, *, attempts: int = 4) -> Path:
        """A verified local copy in the cache, downloaded unless an identical one is there."""
        base = (cache_dir or default_cache_dir()) / "gcs" / self.bucket / self.prefix
        for _ in range(attempts):
            snap = self.read()
            if snap is None:
                raise IncompletePartitionError(
                    f"{self.uri}: partition is missing or incomplete (no manifest)"
                )
            target = base / snapshot_key(snap.manifest)
            if cached_copy_ok(target, snap.manifest):
                return target
            base.mkdir(parents=True, exist_ok=True)
            staging = base / f".tmp-{uuid.uuid4().hex[:12]}"
            try:
                self.download(snap, staging)
                write_verified_marker(staging, snap.manifest)
                try:
                    staging.rename(target)
                except OSError:
                    if not cached_copy_ok(target, snap.manifest):
                        shutil.rmtree(target, ignore_errors=True)
                        staging.rename(target)
            except ObjectGoneError as e:
                log.info("%s changed while reading (%s); reading the new manifest", self.uri, e)
                continue
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            _prune_siblings(base, keep=target.name)
            return target
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


def cached_copy_ok(d: Path, manifest: Manifest) -> bool:
    """A cached copy is usable: its manifest matches and no file changed since it was verified.

    Files are sha256-verified when downloaded, then get a fixed mtime in the past
    (`_pin_mtimes`); any later write moves the mtime, so a changed size or mtime means
    the copy is rejected and downloaded again.
    """
    try:
        cached = Manifest.from_json((d / MANIFEST_NAME).read_text(), str(d))
    except (OSError, StorageError):
        return False
    if cached.files != manifest.files:
        return False
    stamp = _stamp_ns(d)
    for f in manifest.files:
        try:
            st = (d / f.path).stat()
        except OSError:
            return False
        if st.st_size != f.size or st.st_mtime_ns != stamp:
            return False
    return True


def _stamp_ns(d: Path) -> int:
    return (d / MANIFEST_NAME).stat().st_mtime_ns - _STAMP_AGE_NS


def write_verified_marker(d: Path, manifest: Manifest) -> None:
    """Mark `d` as a verified copy of `manifest`: write it as `manifest.json`, pin mtimes.

    Every file gets one mtime, a fixed interval before the marker's, so any later
    write to a file (which sets its mtime to now) shows up in `cached_copy_ok`.
    """
    marker = d / MANIFEST_NAME
    marker.write_text(manifest.to_json())
    now = time.time_ns()
    stamp = now - _STAMP_AGE_NS
    for f in manifest.files:
        os.utime(d / f.path, ns=(stamp, stamp))
    os.utime(marker, ns=(now, now))


def _prune_siblings(base: Path, keep: str) -> None:
    """Drop other cached versions of the same directory (and stale staging dirs)."""
    cutoff = time.time() - 3600
    for p in base.iterdir():
        if p.name == keep or not p.is_dir():
            continue
        if p.name.startswith(".tmp-") and p.stat().st_mtime > cutoff:
            continue  # another process may be downloading into it
        shutil.rmtree(p, ignore_errors=True)


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
            Path(src), asset=asset, partition=partition_dirname(partition), metadata=metadata
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
                keys.add(parts[0])
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
