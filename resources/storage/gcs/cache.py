"""The verified local cache of GCS directories: download once, reuse while unchanged.

``GCSManifestDir.local_copy`` downloads a partition into a local cache directory
(``$LAB_CACHE_DIR``, default ``<tmp>/lab-cache``), one subdirectory per version keyed
by the manifest's sha256s, so a replaced partition is downloaded again and an unchanged
one is reused. A copy is sha256-checked against the manifest when downloaded, then
marked verified; this module holds that marking and the cheap check that a copy is still
as verified (sizes and pinned mtimes, no rehashing). Pinned mtimes can be faked with
``os.utime``, so a reader also checks the copy's sha256s through
``resources.storage.integrity`` (remembered by file identity, ctime included, so an
untouched copy is not re-hashed on every read).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from resources.storage.base import MANIFEST_NAME, Manifest, StorageError
from resources.storage.integrity import CACHE_ENV, default_cache_dir

__all__ = [
    "CACHE_ENV",
    "cached_copy_ok",
    "default_cache_dir",
    "prune_siblings",
    "snapshot_key",
    "write_verified_marker",
]
# Cached files get an mtime this far in the past (see write_verified_marker).
_STAMP_AGE_NS = 10 * 10**9


def snapshot_key(manifest: Manifest) -> str:
    """Content key of a manifest's files: equal keys mean byte-identical directories."""
    h = hashlib.sha256()
    for f in sorted(manifest.files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return h.hexdigest()[:20]


def cached_copy_ok(d: Path, manifest: Manifest) -> bool:
    """A cached copy is usable: its manifest matches and no file changed since it was verified.

    Files are sha256-verified when downloaded, then get a fixed mtime in the past
    (`write_verified_marker`); any later write moves the mtime, so a changed size or
    mtime means the copy is rejected and downloaded again.
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


def prune_siblings(base: Path, keep: str) -> None:
    """Drop other cached versions of the same directory (and stale staging dirs)."""
    cutoff = time.time() - 3600
    for p in base.iterdir():
        if p.name == keep or not p.is_dir():
            continue
        if p.name.startswith(".tmp-") and p.stat().st_mtime > cutoff:
            continue  # another process may be downloading into it
        shutil.rmtree(p, ignore_errors=True)
