"""Google Cloud Storage plumbing shared by the GCS artifact store and the model cache.

Three things every GCS caller here needs, kept in one place so they behave alike:

- **A client.** Against real GCS it comes from dagster-gcp's ``GCSResource``, which
  uses Application Default Credentials: ``gcloud auth application-default login`` on a
  laptop, ``GOOGLE_APPLICATION_CREDENTIALS`` naming a service-account key kept outside
  the repository, or the VM's service account through the metadata server on GCE.
  With ``STORAGE_EMULATOR_HOST`` set it talks to that emulator instead, with
  anonymous credentials and the project from ``GOOGLE_CLOUD_PROJECT`` (or a default).
- **A retry policy.** The client's ``DEFAULT_RETRY`` predicate (429, 408, 5xx, dropped
  connections, timeouts) with exponential back-off and an overall deadline. Calls that
  are only safe to repeat under a generation precondition get the conditional form.
- **Error translation.** A failure that retrying cannot fix (403, a missing bucket, a
  precondition lost to another writer, a checksum mismatch, retries exhausted) becomes a
  ``StorageError`` whose message names the bucket and the object and says what to do.
"""

from __future__ import annotations

import re

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exc
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import (
    DEFAULT_RETRY,
    ConditionalRetryPolicy,
    is_generation_specified,
)

from resources.remote.protocol import EMULATOR_ENV, make_storage_client
from resources.storage.base import ConcurrentWriteError as BaseConcurrentWriteError
from resources.storage.base import StorageError


class GCSError(StorageError):
    """A GCS call failed for good; the message names the bucket, the object and the cause."""


class ConcurrentWriteError(GCSError, BaseConcurrentWriteError):
    """Another writer committed the same location first (a generation precondition failed).

    Also a `resources.storage.base.ConcurrentWriteError`: one class to catch for both stores."""


class ObjectGoneError(GCSError):
    """An object the manifest names is gone: a newer commit replaced the partition."""


class CorruptObjectError(GCSError):
    """What was read does not match the manifest: corrupted in transfer (retried), or
    stored corrupt or overwritten outside the lab (the partition needs rebuilding).
    `problems` are `resources.storage.base.FileProblem`s, one per file at fault."""

    def __init__(self, message: str, problems: list):
        super().__init__(message)
        self.problems = list(problems)


class DownloadCorruptError(CorruptObjectError):
    """A downloaded file's checksum disagrees with the manifest (the client's crc32c check
    or the lab's sha256 check)."""


class ObjectOverwrittenError(CorruptObjectError):
    """A committed object's pinned generation is gone while the manifest still names it:
    overwritten or deleted outside the lab (a new commit would have a new manifest)."""


def make_client(project: str | None = None, *, endpoint: str | None = None) -> storage.Client:
    """`protocol.make_storage_client`, with missing credentials as a `GCSError` saying what to do."""
    try:
        return make_storage_client(project, endpoint=endpoint)
    except auth_exc.DefaultCredentialsError as e:
        raise GCSError(
            "no Google credentials found for GCS: run `gcloud auth application-default "
            "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key kept "
            "outside the repository, or run on a VM with a service account "
            f"(or set {EMULATOR_ENV} to use an emulator): {e}"
        ) from e


def retry_policy(
    *,
    initial: float = 1.0,
    maximum: float = 32.0,
    multiplier: float = 2.0,
    timeout: float = 300.0,
) -> Retry:
    """Exponential back-off on the client's transient-error predicate (429/5xx/connection)."""
    return DEFAULT_RETRY.with_delay(
        initial=initial, maximum=maximum, multiplier=multiplier
    ).with_timeout(timeout)


def if_generation_specified(retry: Retry) -> ConditionalRetryPolicy:
    """`retry`, applied only when the call carries a generation precondition (so is idempotent)."""
    return ConditionalRetryPolicy(retry, is_generation_specified, ["query_params"])


def _status(e: BaseException) -> int | None:
    code = getattr(e, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _server_message(e: BaseException) -> str:
    """The server's own error message when the response carries one, else the exception's."""
    msg = str(getattr(e, "message", None) or e)
    m = re.search(r'"message"\s*:\s*"((?:[^"\\]|\\.)*)"', msg)
    if m:
        msg = m.group(1)
    return " ".join(msg.split())[:300]


def translate(
    e: BaseException, bucket: str, name: str, action: str, *, bucket_missing: bool = False
) -> GCSError:
    """A clear `GCSError` for a failed call on gs://bucket/name while doing `action`."""
    where = f"gs://{bucket}/{name}" if name else f"gs://{bucket}"
    if isinstance(e, GCSError):
        return e
    if isinstance(e, gexc.RetryError):
        cause = e.cause or e
        code = _status(cause)
        last = f"HTTP {code}" if code else type(cause).__name__
        return GCSError(
            f"{where}: {action} kept failing with transient errors until the retry deadline "
            f"ran out; last error: {last}: {_server_message(cause)}"
        )
    if isinstance(e, auth_exc.DefaultCredentialsError):
        return GCSError(f"{where}: {action}: no usable Google credentials: {e}")
    if isinstance(e, auth_exc.RefreshError):
        return GCSError(
            f"{where}: {action}: the Google credentials could not be refreshed (expired or "
            f"revoked? re-run `gcloud auth application-default login`): {e}"
        )
    if isinstance(e, DataCorruption):
        return GCSError(f"{where}: checksum mismatch while {action}: {_server_message(e)}")
    status = _status(e)
    if isinstance(e, gexc.PreconditionFailed) or status == 412:
        return ConcurrentWriteError(
            f"{where}: {action}: another writer changed this object first "
            "(generation precondition failed)"
        )
    if status in (401, 403):
        return GCSError(
            f"{where}: permission denied ({status}) while {action} in bucket '{bucket}': the "
            "credentials in use (Application Default Credentials or the VM's service account) "
            f"lack access to it. Server said: {_server_message(e)}"
        )
    if status == 404 and bucket_missing:
        return GCSError(
            f"{where}: bucket '{bucket}' does not exist (404) while {action}: create it "
            "or fix the storage root"
        )
    if status == 404:
        return GCSError(f"{where}: not found (404) while {action}")
    if isinstance(e, (gexc.GoogleAPICallError, InvalidResponse)):
        return GCSError(f"{where}: {action} failed ({status}): {_server_message(e)}")
    return GCSError(f"{where}: {action} failed: {type(e).__name__}: {_server_message(e)}")


GCS_FAILURES: tuple[type[BaseException], ...] = (
    gexc.GoogleAPIError,
    InvalidResponse,
    DataCorruption,
    auth_exc.GoogleAuthError,
    ConnectionError,
)
"""Exceptions a storage call can raise that `translate` turns into a `GCSError`."""


def is_gcs_failure(e: BaseException) -> bool:
    """A failure of a storage call (not a bug in the caller): API, auth, transport errors."""
    if isinstance(e, GCSError):
        return False
    # requests' and urllib3's own exceptions surface when retries are disabled.
    return isinstance(e, GCS_FAILURES) or type(e).__module__.startswith(("requests", "urllib3"))
