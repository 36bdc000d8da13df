"""The VM deleting itself: one Compute Engine REST call with the metadata server's token.

Ships to the VM beside the agent (standard library only). A warm VM that has no next
step, or whose orchestrator is gone, must not wait for someone else to delete it: it
asks the Compute API to delete its own instance, authenticated as the VM's service
account with the access token the metadata server hands out
(``instance/service-accounts/default/token``), at the endpoint its instructions name
(the fake Compute Engine in the tests; ``https://compute.googleapis.com`` on GCE).
If that fails (no permission, no network), the VM stops heart-beating and the
launcher or the reaper deletes it; the dead-man switch (``maxRunDuration``) bounds it
in any case.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from resources.remote.agent_metadata import Metadata
from resources.remote.protocol import DEFAULT_COMPUTE_ENDPOINT, TOKEN_PATH, instance_path


def whoami(md: Metadata) -> tuple[str, str, str]:
    """(project, zone, instance name) from the metadata server."""
    project = (md.get("project/project-id") or "").strip()
    zone = (md.get("instance/zone") or "").strip().rsplit("/", 1)[-1]
    name = (md.get("instance/name") or "").strip()
    if not (project and zone and name):
        raise RuntimeError(f"metadata server: project {project!r} zone {zone!r} name {name!r}")
    return project, zone, name


def access_token(md: Metadata) -> str:
    raw = md.get(TOKEN_PATH)
    if not raw:
        raise RuntimeError(f"the metadata server has no {TOKEN_PATH}")
    return json.loads(raw)["access_token"]


def delete_self(md: Metadata, endpoint: str | None = None, timeout_s: float = 30.0) -> str:
    """Ask Compute Engine to delete this instance; returns what happened, in words.

    Raises when the API refuses or cannot be reached (the caller logs it and lets the
    launcher, the reaper or ``maxRunDuration`` finish the job)."""
    project, zone, name = whoami(md)
    url = (endpoint or DEFAULT_COMPUTE_ENDPOINT).rstrip("/") + instance_path(project, zone, name)
    req = urllib.request.Request(
        url, method="DELETE", headers={"Authorization": f"Bearer {access_token(md)}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            op = json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return f"{name} is already gone"
        body = e.read()[:300].decode("utf-8", "replace")
        raise RuntimeError(f"instances.delete {name}: HTTP {e.code}: {body}") from None
    return f"instances.delete {name} accepted (operation {op.get('name', '?')})"
