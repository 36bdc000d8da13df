"""The model cache: base model snapshots at a pinned revision, nearest tier first.

Tiers, nearest first:

1. **local**: a directory on this machine (e.g. baked into a VM image),
   ``<local_dir>/<org>--<name>/<revision>/``;
2. **gcs**: a shared cache in a bucket, ``<gcs_uri>/<repo_id>/<revision>/`` with its
   own ``manifest.json`` (files, sizes, sha256), written with the artifact store's safe
   protocol (``resources.storage.gcs.manifest_dir``), so every VM of a project downloads
   a model from the Hub at most once;
3. **hub**: the Hugging Face Hub at the pinned revision (``snapshot_download``).

A snapshot fetched from a farther tier is stored in the nearer ones for next time
(Hub -> GCS and local, GCS -> local). ``fetch`` returns which tier served and how long
it took. An entry is used only once it checks out: the local one against its marker
(sizes, sha256, and a valid header in every safetensors file), the GCS one by sha256
against its manifest after download plus the same header check. A corrupt or partial
entry is logged and refetched from the next tier, never used; a corrupt GCS entry is
then replaced by the fresh copy.

Local entries are sha256-checked cheaply: after verification every file gets one fixed
mtime well in the past, recorded in the marker; a file whose size or mtime differs later
is hashed again (any write moves the mtime), the others are trusted. A file that hashes
correctly again (say the entry was copied without keeping mtimes) gets the stamp back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagster import ConfigurableResource
from pydantic import PrivateAttr

from resources.storage.base import StorageError, sha256_file

if TYPE_CHECKING:
    from resources.storage.gcs.manifest_dir import GCSManifestDir

# What a causal LM needs; never pickles (*.bin) or other frameworks' weights.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
MARKER = ".lab-complete.json"
_STAMP_AGE_NS = 10 * 10**9
_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB

LogFn = Callable[[str], None]


class ModelCacheError(RuntimeError):
    pass


@dataclass(frozen=True)
class FetchResult:
    path: Path
    tier: str  # "local" | "gcs" | "hub"
    seconds: float
    # Why nearer tiers were passed over, e.g. "local: sha256 mismatch in model.safetensors".
    skipped: tuple[str, ...] = field(default=())


def _entry_dir(root: Path, repo_id: str, revision: str) -> Path:
    return root / repo_id.replace("/", "--") / revision


def _listing(d: Path) -> dict[str, int]:
    return {
        p.relative_to(d).as_posix(): p.stat().st_size
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != MARKER and ".cache" not in p.relative_to(d).parts
    }


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (header and data extent), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name}: {size} bytes, shorter than a safetensors header"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            return f"{path.name}: header length {n} runs past the end of the file"
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            return f"{path.name}: header is not JSON ({e})"
    if not isinstance(header, dict):
        return f"{path.name}: header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return f"{path.name}: tensor {name!r} has no valid data_offsets"
        if not 0 <= begin <= stop:
            return f"{path.name}: tensor {name!r} has data_offsets {begin}..{stop}"
        end = max(end, stop)
    if 8 + n + end != size:
        return f"{path.name}: tensors end at byte {8 + n + end} but the file has {size} bytes"
    return None


def snapshot_problem(d: Path, files: dict[str, int]) -> str | None:
    """Whether a snapshot directory is usable as a model: safetensors present and whole."""
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        return "the snapshot has no safetensors"
    for f in weights:
        problem = safetensors_problem(d / f)
        if problem:
            return problem
    return None


def local_entry_problem(d: Path) -> str | None:
    """Why a local entry cannot be used (None: it is complete and intact)."""
    try:
        marker = json.loads((d / MARKER).read_text())
        listed: dict[str, int] = marker["files"]
        sha: dict[str, str] = marker["sha256"]
        stamp = int(marker["stamp_ns"])
    except FileNotFoundError:
        return "no completion marker"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable completion marker ({e})"
    on_disk = _listing(d)
    if not listed or on_disk != listed:
        missing = sorted(set(listed) - set(on_disk))
        wrong = sorted(f for f in listed if f in on_disk and on_disk[f] != listed[f])
        return f"files missing {missing} or of the wrong size {wrong}"
    rehashed = []
    for rel in listed:
        p = d / rel
        if p.stat().st_mtime_ns != stamp:
            if sha256_file(p) != sha.get(rel):
                return f"sha256 mismatch in {rel}"
            rehashed.append(p)
    problem = snapshot_problem(d, listed)
    if problem is None:
        # Touched but intact (e.g. copied without keeping mtimes): trust them from now on.
        for p in rehashed:
            try:
                os.utime(p, ns=(stamp, stamp))
            except OSError:
                pass  # a read-only copy is simply hashed again next time
    return problem


def _install(staging: Path, entry: Path, sha256: dict[str, str]) -> None:
    """Mark `staging` complete (sizes, sha256, pinned mtimes) and move it to `entry`."""
    files = _listing(staging)
    stamp = time.time_ns() - _STAMP_AGE_NS
    for rel in files:
        os.utime(staging / rel, ns=(stamp, stamp))
    marker = {"files": files, "sha256": {k: sha256[k] for k in files}, "stamp_ns": stamp}
    (staging / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
    shutil.rmtree(entry, ignore_errors=True)
    try:
        staging.rename(entry)
    except OSError:
        if local_entry_problem(entry) is not None:  # not a concurrent fetch that won
            raise


class ModelCache(ConfigurableResource):
    """Fetches `repo_id@revision` snapshots: local disk, then GCS, then the Hub."""

    local_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "task-geometry-lab", "models")
    # gs://bucket/prefix/model-cache; None: no GCS tier.
    gcs_uri: str | None = None
    hub_endpoint: str | None = None  # None: huggingface_hub's default (or $HF_ENDPOINT)
    # None: huggingface_hub reads $HF_TOKEN itself; otherwise pass EnvVar("HF_TOKEN").
    hub_token: str | None = None
    _session: Any = PrivateAttr(default=None)  # a GCSSession, made on first use

    def gcs_entry(self, repo_id: str, revision: str) -> GCSManifestDir | None:
        """The GCS-tier location of a snapshot, or None without a GCS tier."""
        if not self.gcs_uri:
            return None
        from resources.remote.protocol import parse_gs_uri
        from resources.storage.gcs.manifest_dir import GCSManifestDir
        from resources.storage.gcs.session import GCSSession

        if self._session is None:
            self._session = GCSSession()
        bucket, prefix = parse_gs_uri(self.gcs_uri)
        path = "/".join(p for p in (prefix, repo_id, revision) if p)
        return GCSManifestDir(self._session, bucket, path)

    def fetch(self, repo_id: str, revision: str, log: LogFn | None = None) -> FetchResult:
        log = log or (lambda msg: None)
        t0 = time.perf_counter()
        entry = _entry_dir(Path(self.local_dir), repo_id, revision)
        skipped: list[str] = []
        problem = local_entry_problem(entry)
        if problem is None:
            return FetchResult(entry, "local", time.perf_counter() - t0)
        if entry.exists():
            log(f"model cache: local entry {entry} is unusable ({problem}); refetching")
            skipped.append(f"local: {problem}")
        entry.parent.mkdir(parents=True, exist_ok=True)
        remote = self.gcs_entry(repo_id, revision)
        if remote is not None:
            problem = self._from_gcs(remote, entry, log)
            if problem is None:
                return self._done(entry, "gcs", t0, skipped, log)
            skipped.append(f"gcs: {problem}")
        self._from_hub(repo_id, revision, entry, log, remote)
        return self._done(entry, "hub", t0, skipped, log)

    @staticmethod
    def _done(entry: Path, tier: str, t0: float, skipped: list[str], log: LogFn) -> FetchResult:
        result = FetchResult(entry, tier, time.perf_counter() - t0, tuple(skipped))
        log(f"model cache: {entry.name} served by the {tier} tier in {result.seconds:.2f} s")
        return result

    def _from_gcs(self, remote: GCSManifestDir, entry: Path, log: LogFn) -> str | None:
        """Copy the GCS entry to `entry`; the reason it could not be used, or None."""
        try:
            snap = remote.read()
        except StorageError as e:
            log(f"model cache: GCS tier unavailable ({e}); going to the Hub")
            return f"unavailable: {e}"
        if snap is None:
            log(f"model cache: {remote.uri} is not cached in GCS yet")
            return "not cached"
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=entry.parent))
        try:
            log(f"model cache: downloading {remote.uri} from the GCS cache")
            remote.download(snap, staging)  # sha256-checked against the manifest
            problem = snapshot_problem(staging, _listing(staging))
            if problem:
                raise ModelCacheError(problem)
            _install(staging, entry, {f.path: f.sha256 for f in snap.manifest.files})
            return None
        except (StorageError, ModelCacheError) as e:
            log(f"model cache: GCS entry {remote.uri} is corrupt or partial ({e}); refetching")
            return f"corrupt: {e}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _from_hub(
        self,
        repo_id: str,
        revision: str,
        entry: Path,
        log: LogFn,
        remote: GCSManifestDir | None,
    ) -> None:
        from huggingface_hub import snapshot_download

        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=entry.parent))
        try:
            log(f"model cache: downloading {repo_id}@{revision} from the Hub")
            try:
                snapshot_download(
                    repo_id=repo_id,
                    revision=revision,
                    local_dir=staging,
                    # Keep huggingface_hub's refs/trees bookkeeping out of the user's cache.
                    cache_dir=staging / ".cache" / "hub",
                    allow_patterns=SNAPSHOT_PATTERNS,
                    endpoint=self.hub_endpoint,
                    token=self.hub_token,
                )
            except Exception as e:
                where = self.hub_endpoint or "the Hub"
                raise ModelCacheError(
                    f"{repo_id}@{revision}: not in a nearer cache tier, and fetching it from "
                    f"{where} failed: {type(e).__name__}: {e}"
                ) from e
            shutil.rmtree(staging / ".cache", ignore_errors=True)
            files = _listing(staging)
            problem = snapshot_problem(staging, files)
            if problem:
                raise ModelCacheError(f"{repo_id}@{revision} from the Hub: {problem}")
            sha256 = None
            if remote is not None:
                sha256 = self._to_gcs(remote, staging, repo_id, revision, log)
            if sha256 is None:
                sha256 = {rel: sha256_file(staging / rel) for rel in files}
            _install(staging, entry, sha256)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _to_gcs(
        remote: GCSManifestDir, src: Path, repo_id: str, revision: str, log: LogFn
    ) -> dict[str, str] | None:
        """Upload a fresh snapshot to the GCS tier; its sha256s, or None if that failed."""
        try:
            manifest = remote.commit(
                src,
                asset=repo_id,
                partition=revision,
                metadata={"repo_id": repo_id, "revision": revision, "source": "hub"},
            )
        except StorageError as e:
            # The model is here and usable; the shared cache is an optimisation.
            log(f"model cache: could not upload {repo_id}@{revision} to {remote.uri}: {e}")
            return None
        log(f"model cache: uploaded {repo_id}@{revision} to {remote.uri}")
        return {f.path: f.sha256 for f in manifest.files}
