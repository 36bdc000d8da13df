"""The fake Compute Engine's wire shapes: error payloads, operations, list filters.

Split out of ``fake_compute`` so the server's routing and the VM lifecycle read
apart from what the responses look like. Everything here mirrors the real API:
the error body ``{"error": {"code", "message", "errors": [{"reason", "message",
"domain"}]}}``, an ``Operation`` that is DONE only once the work it stands for
has finished, and the subset of the list ``filter`` syntax the lab uses.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

API = "https://www.googleapis.com/compute/v1"
ids = itertools.count(1000)


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str, domain: str = "global"):
        super().__init__(message)
        self.status, self.reason, self.message, self.domain = status, reason, message, domain

    def payload(self) -> dict:
        return {
            "error": {
                "code": self.status,
                "message": self.message,
                "errors": [{"message": self.message, "domain": self.domain, "reason": self.reason}],
            }
        }


@dataclass
class Operation:
    """A zonal or global operation.

    DONE no earlier than ``done_at`` (the fake's ``op_delay_s``) and, for one made
    with ``pending=True``, not before ``finish()``: as on GCE, a delete operation
    is DONE only once the instance is gone (a GET then answers 404).
    """

    body: dict
    done_at: float
    pending: bool = False
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def finish(self) -> None:
        with self._changed:
            self.pending = False
            self._changed.notify_all()

    def is_done(self) -> bool:
        return not self.pending and time.time() >= self.done_at

    def wait(self, timeout_s: float) -> None:
        """Until DONE or `timeout_s` (operations.wait returns either way, like GCE's)."""
        deadline = time.time() + timeout_s
        with self._changed:
            self._changed.wait_for(lambda: not self.pending, timeout=timeout_s)
        time.sleep(max(0.0, min(self.done_at, deadline) - time.time()))

    def view(self) -> dict:
        body = dict(self.body)
        if self.is_done():
            body["status"] = "DONE"
            body["progress"] = 100
            body.setdefault("endTime", now_rfc3339())
        return body


def send(
    h: BaseHTTPRequestHandler,
    status: int,
    body: str | dict,
    ctype: str,
    headers: dict[str, str] | None = None,
) -> None:
    data = (json.dumps(body) if isinstance(body, dict) else body).encode()
    try:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client (an agent being killed) went away


_LABEL_TERM = re.compile(r'^\(?\s*([\w.-]+)\s*(?:=|eq)\s*"?([^"\s)]*)"?\s*\)?$')


def matches_filter(resource: dict, expr: str | None) -> bool:
    """The subset of the list filter syntax the lab uses: `a.b = "v" AND c = "w"`."""
    if not expr:
        return True
    for term in re.split(r"\s+AND\s+", expr.strip()):
        m = _LABEL_TERM.match(term.strip())
        if not m:
            raise ApiError(400, "invalid", f"Invalid list filter expression '{expr}'.")
        path, want = m.groups()
        value: Any = resource
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if str(value) != want:
            return False
    return True
