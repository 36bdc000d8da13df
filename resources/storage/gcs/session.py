"""The GCS session: one client, retry policy and transfer settings, and the transfers.

Everything that moves bytes between this machine and a bucket goes through
``GCSSession``, so every GCS directory (artifact partitions, model-cache snapshots)
transfers, retries and reports errors alike. It knows objects and prefixes, not
manifests; the manifest protocol is in ``resources.storage.gcs.manifest_dir``.

Transfers: many files go through ``transfer_manager.upload_many``/``download_many``;
files above ``TransferConfig.sliced_threshold`` through ``upload_chunks_concurrently``
(the XML multipart API) and ``download_chunks_concurrently``, in threads by default
(processes fork, which is unsafe inside a threaded host such as a Dagster run).
Emulators lack the XML multipart API, so sliced *uploads* are on by default only
against ``*.googleapis.com``. Every upload is checked against the local file's crc32c
(per request, or end to end after ``reload()`` for sliced ones) and every download by
crc32c (per request, or combined over slices). Transient errors (429, 5xx, dropped
connections) are retried with back-off; calls that are only idempotent under a
generation precondition use the conditional policy (``resources.storage.gcs.client``).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import storage
from google.cloud.storage import transfer_manager as tm
from google.cloud.storage.exceptions import DataCorruption

from resources.storage.base import FileProblem
from resources.storage.gcs.client import (
    DownloadCorruptError,
    GCSError,
    ObjectGoneError,
    if_generation_specified,
    is_gcs_failure,
    make_client,
    retry_policy,
    translate,
)

log = logging.getLogger(__name__)

_CHUNK = 1 << 20

ProgressFn = Callable[[int], None]


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
                if not (is_gcs_failure(e) or isinstance(e, DataCorruption)):
                    raise
                raise self._download_error(e, bucket, name, gen) from e
            if progress:
                progress(size)

    def _download_error(
        self, e: BaseException, bucket: str, name: str, gen: int | None
    ) -> GCSError:
        if isinstance(e, DataCorruption):
            return DownloadCorruptError(
                f"gs://{bucket}/{name}: corrupted in transfer (crc32c mismatch)",
                [FileProblem(name, "crc32c", found="mismatch in transfer")],
            )
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
