"""The VM agent's client for the GCE metadata server (stdlib only; ships to the VM).

Split out of ``agent``: every mode reads its instructions here, and the step mode
long-polls ``instance/preempted``. The host is ``$GCE_METADATA_HOST`` (the fake
Compute Engine in the tests sets it), else ``metadata.google.internal``.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request

from resources.remote.protocol import METADATA_HOST_ENV


class Metadata:
    def __init__(self, host: str | None = None):
        self.base = (
            f"http://{host or os.environ.get(METADATA_HOST_ENV) or 'metadata.google.internal'}"
            "/computeMetadata/v1/"
        )
        self._preempted_etag: str | None = None

    def get(self, path: str, timeout: float = 10.0) -> str | None:
        return self._get(path, timeout)[0]

    def _get(self, path: str, timeout: float) -> tuple[str | None, str | None]:
        """The value at `path` and its ETag (None, None for a 404)."""
        req = urllib.request.Request(self.base + path, headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.read().decode(), r.headers.get("ETag")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None, None
            raise

    def attribute(self, key: str) -> str | None:
        return self.get(f"instance/attributes/{key}")

    def wait_preempted(self, timeout_s: int) -> bool:
        """Long-polls ``instance/preempted``: returns when it changes or after `timeout_s`.

        Each poll passes the ETag of the value the previous one saw (``last_etag``), so a
        flip that happens between two polls is answered at once instead of when the next
        poll times out: GCE gives a preempted VM 30 s, the default poll's length."""
        if self._preempted_etag is None:  # the first poll: what is it now?
            v, self._preempted_etag = self._get("instance/preempted", timeout=10.0)
            if (v or "").strip().upper() == "TRUE":
                return True
        path = f"instance/preempted?wait_for_change=true&timeout_sec={timeout_s}"
        if self._preempted_etag:
            path += f"&last_etag={urllib.parse.quote(self._preempted_etag)}"
        v, etag = self._get(path, timeout=timeout_s + 5)
        self._preempted_etag = etag or self._preempted_etag
        return (v or "").strip().upper() == "TRUE"
