"""The few GCS operations the GCE launcher needs, on google-cloud-storage directly.

Bundle upload, reading the agent's chunk streams and status, the cost ledger and
deleting a launch's scratch. Kept apart from the artifact store's GCS backend on
purpose: these objects are launch plumbing, not artifacts with manifests.
``STORAGE_EMULATOR_HOST`` selects the emulator (anonymous credentials).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resources.remote.protocol import make_storage_client, parse_gs_uri


@dataclass
class Gcs:
    """A client plus the handful of calls the launcher makes; every path is a gs:// URI."""

    client: Any = None

    def __post_init__(self) -> None:
        if self.client is None:
            self.client = make_storage_client()

    def _blob(self, uri: str):
        bucket, name = parse_gs_uri(uri)
        return self.client.bucket(bucket).blob(name)

    def upload_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream"):
        self._blob(uri).upload_from_string(data, content_type=content_type)

    def upload_file(self, uri: str, path: Path) -> None:
        self._blob(uri).upload_from_filename(str(path))

    def read_bytes(self, uri: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            return self._blob(uri).download_as_bytes()
        except NotFound:
            return None

    def read_json(self, uri: str) -> dict | None:
        data = self.read_bytes(uri)
        return None if data is None else json.loads(data)

    def write_json(self, uri: str, obj: Any) -> None:
        self.upload_bytes(uri, json.dumps(obj, indent=1).encode(), "application/json")

    def list(self, prefix_uri: str) -> list[str]:
        """Object URIs under a prefix (a trailing slash is added), sorted by name."""
        bucket, prefix = parse_gs_uri(prefix_uri)
        return sorted(
            f"gs://{bucket}/{b.name}"
            for b in self.client.list_blobs(bucket, prefix=prefix.rstrip("/") + "/")
        )

    def delete_prefix(self, prefix_uri: str) -> int:
        bucket, prefix = parse_gs_uri(prefix_uri)
        n = 0
        for b in self.client.list_blobs(bucket, prefix=prefix.rstrip("/") + "/"):
            b.delete()
            n += 1
        return n

    def exists(self, uri: str) -> bool:
        return self._blob(uri).exists()


def https_url(uri: str) -> str:
    """The `https://storage.googleapis.com/...` form `images.insert` wants for `rawDisk`."""
    bucket, name = parse_gs_uri(uri)
    return f"https://storage.googleapis.com/{bucket}/{name}"
