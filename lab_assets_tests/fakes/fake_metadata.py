"""A fake GCE metadata server, one per fake instance (what ``GCE_METADATA_HOST`` names).

Split out of ``fake_compute``: the agent and the startup-script tests talk to it
without the Compute API around it. It serves the instance's metadata items
(``instance/attributes/<key>``), ``instance/preempted`` (with the long poll
``wait_for_change=true`` and ``last_etag``, as GCE answers them), ``instance/name``, ``instance/zone``, ``instance/id``,
``instance/service-accounts/default/token``
and ``project/project-id``, and refuses a request without ``Metadata-Flavor: Google``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

from lab_assets_tests.fakes.fake_compute_wire import send

if TYPE_CHECKING:
    import subprocess


@dataclass
class FakeInstance:
    project: str
    zone: str
    body: dict
    created: float = field(default_factory=time.time)
    status: str = "PROVISIONING"
    preempted: bool = False
    proc: subprocess.Popen | None = None
    metadata_server: MetadataServer | None = None
    home: Path | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)
    systemd: Any = None  # the VM's fake PID 1 (``fake_systemd.FakeSystemd``) once booted
    shutdown_events: list[str] = field(default_factory=list)  # a shutdown's steps, in order
    shutting_down: bool = False  # a shutdown has begun (a second one only waits for it)
    powered_off: threading.Event = field(default_factory=threading.Event)
    # The access token the metadata server hands the VM's service account.
    token: str = field(default_factory=lambda: f"ya29.fake-{uuid.uuid4().hex}")

    @property
    def name(self) -> str:
        return self.body["name"]

    def metadata_items(self) -> dict[str, str]:
        return {
            i["key"]: i.get("value", "") for i in self.body.get("metadata", {}).get("items", [])
        }

    def to_json(self) -> dict:
        out = dict(self.body)
        out["status"] = self.status
        return out


class MetadataServer:
    """The per-instance metadata server the agent reads (``GCE_METADATA_HOST``)."""

    def __init__(self, fake: Any, inst: FakeInstance):
        self.fake, self.inst = fake, inst
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                outer._serve(self)

            def do_POST(self):
                outer._serve_systemd(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Metadata-Flavor") != "Google":
            return send(h, 403, "Missing Metadata-Flavor:Google header.", "text/plain")
        url = urlparse(h.path)
        q = parse_qs(url.query)
        path = url.path.removeprefix("/computeMetadata/v1/")
        inst = self.inst
        if path == "instance/preempted":
            # As GCE: a long poll waits for a change from the value it saw when it started,
            # unless `last_etag` names an older value (then it answers at once); every answer
            # carries the value's ETag. Without last_etag, a flip between two polls is only
            # seen when the next poll times out.
            def etag() -> str:
                return f"{'t' if inst.preempted else 'f'}{inst.preempted:d}"

            if q.get("wait_for_change") == ["true"]:
                timeout = float(q.get("timeout_sec", ["30"])[0])
                with inst.changed:
                    seen = q.get("last_etag", [etag()])[0]
                    inst.changed.wait_for(lambda: etag() != seen, timeout=timeout)
            return send(
                h,
                200,
                "TRUE" if inst.preempted else "FALSE",
                "text/plain",
                headers={"ETag": etag()},
            )
        if path == "instance/name":
            return send(h, 200, inst.name, "text/plain")
        if path == "instance/zone":
            return send(h, 200, f"projects/123456789/zones/{inst.zone}", "text/plain")
        if path == "instance/id":
            return send(h, 200, str(inst.body.get("id", "0")), "text/plain")
        if path == "instance/service-accounts/default/token":
            token = {"access_token": inst.token, "expires_in": 3599, "token_type": "Bearer"}
            return send(h, 200, json.dumps(token), "application/json")
        if path == "project/project-id":
            return send(h, 200, inst.project, "text/plain")
        if path.startswith("instance/attributes/"):
            key = path.removeprefix("instance/attributes/")
            items = inst.metadata_items()
            if key in items:
                return send(h, 200, items[key], "text/plain")
        return send(h, 404, "not found", "text/plain")

    def _serve_systemd(self, h: BaseHTTPRequestHandler) -> None:
        """Not GCE: the fake VM's ``systemctl`` shim hands a parsed unit to its PID 1 here."""
        if urlparse(h.path).path != "/fake-systemd/start" or self.inst.systemd is None:
            return send(h, 404, "not found", "text/plain")
        spec = json.loads(h.rfile.read(int(h.headers.get("Content-Length") or 0)))
        return send(h, 200, self.inst.systemd.start(spec), "text/plain")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
