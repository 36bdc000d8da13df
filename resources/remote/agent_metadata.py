"""The VM agent's client for the GCE metadata server (stdlib only; ships to the VM).

Split out of ``agent``: every mode reads its instructions here, and the step mode
long-polls ``instance/preempted``. The host is ``$GCE_METADATA_HOST`` (the fake
Compute Engine in the tests sets it), else ``metadata.google.internal``.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from resources.remote.protocol import METADATA_HOST_ENV


class Metadata:
    def __init__(self, host: str | None = None):
        self.base = (
            f"http://{host or os.environ.get(METADATA_HOST_ENV) or 'metadata.google.internal'}"
            "/computeMetadata/v1/"
        )

    def get(self, path: str, timeout: float = 10.0) -> str | None:
        req = urllib.request.Request(self.base + path, headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def attribute(self, key: str) -> str | None:
        return self.get(f"instance/attributes/{key}")

    def wait_preempted(self, timeout_s: int) -> bool:
        """Long-polls ``instance/preempted`` (returns early when it changes)."""
        v = self.get(
            f"instance/preempted?wait_for_change=true&timeout_sec={timeout_s}",
            timeout=timeout_s + 5,
        )
        return (v or "").strip().upper() == "TRUE"
