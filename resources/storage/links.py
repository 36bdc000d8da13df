"""Where a stored artifact can be opened by a person: a local path, or a GCS console URL.

Stdlib only. ``gs://bucket/prefix`` folders open in the Cloud Console's storage browser
(``https://console.cloud.google.com/storage/browser/BUCKET/PREFIX``), single objects on
their details page; local roots are plain paths.
"""

from __future__ import annotations

from urllib.parse import quote

CONSOLE = "https://console.cloud.google.com/storage"


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def gcs_console_url(uri: str, *, is_file: bool = False) -> str:
    """The Cloud Console page of a `gs://` folder (or, with ``is_file``, of one object)."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    path = quote(uri.removeprefix("gs://").rstrip("/"), safe="/")
    return f"{CONSOLE}/browser/_details/{path}" if is_file else f"{CONSOLE}/browser/{path}"
