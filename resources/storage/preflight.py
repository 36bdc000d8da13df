"""Is a storage root writable? Found out before any compute starts, not after training.

``check_writable(root, experiment)`` writes a small probe where the experiment's
artifacts go (``<root>/<experiment>/``) and deletes it again: on a local path it
creates the directory if it is missing; under ``gs://bucket/prefix`` it creates the
object only if absent (``if_generation_match=0``) and deletes exactly that generation,
through the same client, credentials and error translation as the GCS store. A failure
is a ``StorageError`` naming the root and the OS or GCS error. Cheap: one create and one
delete (on GCS, two requests, with retries bounded by ``timeout_s``).
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from resources.storage.base import StorageError

PROBE_PREFIX = ".lab-preflight-"


def _probe_name() -> str:
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:40]
    return f"{PROBE_PREFIX}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_writable(root: str, experiment: str, *, timeout_s: float = 60.0) -> str:
    """Write and delete a probe under `<root>/<experiment>/`; return where it was written.

    Raises `StorageError` ("storage root R is not writable: ...") when either step fails.
    """
    if root.startswith("gs://"):
        return _check_gcs(root.rstrip("/"), experiment, timeout_s)
    return _check_local(Path(root), experiment)


def _fail(root: str, what: str, cause: object) -> StorageError:
    return StorageError(
        f"storage root {root} is not writable: {what}: {cause} "
        "(fix the experiment's `storage` or $LAB_STORAGE_ROOT; nothing was run)"
    )


def _check_local(root: Path, experiment: str) -> str:
    base = root / experiment
    probe = base / _probe_name()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _fail(str(root), f"cannot create {base}", _os_error(e)) from e
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"lab storage preflight\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _fail(str(root), f"cannot write a probe file in {base}", _os_error(e)) from e
    try:
        probe.unlink()
    except OSError as e:
        raise _fail(str(root), f"cannot delete the probe file {probe}", _os_error(e)) from e
    return str(probe)


def _os_error(e: OSError) -> str:
    return f"{type(e).__name__}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")


def _check_gcs(root: str, experiment: str, timeout_s: float) -> str:
    try:
        from resources.storage.gcs.client import retry_policy
        from resources.storage.gcs.session import GCSSession
    except ImportError as e:  # pragma: no cover - google-cloud-storage missing
        raise _fail(root, "the gs:// backend is not available", e) from e
    from resources.remote.protocol import GsUriError, parse_gs_uri

    try:
        bucket, prefix = parse_gs_uri(root)
    except GsUriError as e:
        raise _fail(root, "not a gs://bucket/prefix URI", e) from e
    name = f"{prefix}/{experiment}/{_probe_name()}" if prefix else f"{experiment}/{_probe_name()}"
    session = GCSSession(retry=retry_policy(maximum=8.0, timeout=timeout_s))
    try:
        blob = session.bucket(bucket).blob(name)
        with session.guard(bucket, name, "writing a probe object"):
            blob.upload_from_string(
                b"lab storage preflight\n",
                content_type="text/plain",
                if_generation_match=0,
                retry=session.conditional_retry,
            )
        with session.guard(bucket, name, "deleting the probe object"):
            blob.delete(if_generation_match=blob.generation, retry=session.conditional_retry)
    except StorageError as e:
        raise _fail(root, "probe failed", e) from e
    return f"gs://{bucket}/{name}"
