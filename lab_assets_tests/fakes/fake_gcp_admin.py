"""A fake of the Google admin APIs `lab doctor` calls, and of Google's OAuth token endpoint.

One local server (``LAB_GCP_ADMIN_ENDPOINT``) answers, as the real services shape it:

- ``POST /token``: the OAuth 2.0 token endpoint a service-account key's ``token_uri``
  names; google-auth's real refresh (a signed JWT assertion) gets a bearer token;
- Service Usage ``GET /v1/projects/P/services:batchGet?names=...``: each service
  ``ENABLED`` unless it is in the Compute fake's ``disabled_services``;
- Resource Manager ``POST /v1/projects/P:getIamPolicy``: ``project_bindings``;
- IAM ``GET /v1/projects/-/serviceAccounts/EMAIL`` (404 unless in
  ``service_accounts``) and ``POST ...:testIamPermissions`` (``actAs`` granted to the
  caller unless ``caller_may_act_as`` is False);
- Cloud Storage ``GET /storage/v1/b/BUCKET/iam``: ``bucket_bindings[BUCKET]`` (404 for
  a bucket it does not know).

Every call but ``/token`` needs a bearer token it issued (else 401, as Google answers
a request without credentials); a disabled API answers 403 with the real payload
(``errors[].reason`` ``accessNotConfigured``, an ``ErrorInfo`` detail ``SERVICE_DISABLED``).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlparse

from lab_assets_tests.fakes.fake_compute_project import PROJECT_NUMBER, default_service_account

if TYPE_CHECKING:
    from lab_assets_tests.fakes.fake_compute import FakeCompute

_BATCH = re.compile(r"^/v1/projects/([^/]+)/services:batchGet$")
_POLICY = re.compile(r"^/v1/projects/([^/:]+):getIamPolicy$")
_SA = re.compile(r"^/v1/projects/-/serviceAccounts/([^/:]+)(:testIamPermissions)?$")
_BUCKET_IAM = re.compile(r"^/storage/v1/b/([^/]+)/iam$")
TITLES = {
    "compute.googleapis.com": "Compute Engine API",
    "storage.googleapis.com": "Cloud Storage API",
    "iam.googleapis.com": "Identity and Access Management (IAM) API",
    "serviceusage.googleapis.com": "Service Usage API",
    "cloudresourcemanager.googleapis.com": "Cloud Resource Manager API",
}


class AdminError(Exception):
    def __init__(self, status: int, status_name: str, message: str, reason: str = "", **info):
        super().__init__(message)
        self.status, self.status_name, self.message = status, status_name, message
        self.reason, self.info = reason, info

    def payload(self) -> dict:
        err: dict = {"code": self.status, "message": self.message, "status": self.status_name}
        if self.reason:
            err["errors"] = [
                {"message": self.message, "domain": "usageLimits", "reason": "accessNotConfigured"}
            ]
            err["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": self.reason,
                    "domain": "googleapis.com",
                    "metadata": self.info,
                }
            ]
        return {"error": err}


def bucket_defaults(project: str) -> list[dict]:
    """A new uniform-access bucket's policy: the legacy roles on the project's basic roles."""
    return [
        {
            "role": "roles/storage.legacyBucketOwner",
            "members": [f"projectEditor:{project}", f"projectOwner:{project}"],
        },
        {"role": "roles/storage.legacyBucketReader", "members": [f"projectViewer:{project}"]},
        {
            "role": "roles/storage.legacyObjectOwner",
            "members": [f"projectEditor:{project}", f"projectOwner:{project}"],
        },
        {"role": "roles/storage.legacyObjectReader", "members": [f"projectViewer:{project}"]},
    ]


class FakeGcpAdmin:
    """The server; a context manager. `url` is the endpoint; `token_uri` goes in a key file."""

    def __init__(self, compute: FakeCompute, project: str = "lab-test-project"):
        self.compute = compute
        self.project = project
        self.service_accounts: set[str] = {default_service_account()}
        self.project_bindings: list[dict] = []
        self.bucket_bindings: dict[str, list[dict]] = {}
        self.caller_may_act_as = True
        self.tokens: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _dispatch(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    status, out = outer._handle(
                        method, self.path, raw, self.headers.get("Authorization")
                    )
                except AdminError as e:
                    status, out = e.status, e.payload()
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def __enter__(self) -> FakeGcpAdmin:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- requests -------------------------------------------------------------------------

    def _handle(self, method: str, raw_path: str, raw: bytes, auth: str | None):
        url = urlparse(raw_path)
        path, query = url.path, parse_qs(url.query)
        with self._lock:
            self.calls.append((method, path))
        if path == "/token" and method == "POST":
            form = parse_qs(raw.decode())
            if "assertion" not in form and "refresh_token" not in form:
                raise AdminError(400, "INVALID_ARGUMENT", "invalid_grant")
            token = f"fake-token-{next(self._ids)}"
            with self._lock:
                self.tokens.add(token)
            return 200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}
        if not auth or auth.removeprefix("Bearer ") not in self.tokens:
            raise AdminError(
                401,
                "UNAUTHENTICATED",
                "Request is missing required authentication credential.",
            )
        if m := _BATCH.match(path):
            self._enabled("serviceusage.googleapis.com", m.group(1))
            return 200, {"services": [self._service(n) for n in query.get("names", [])]}
        if (m := _POLICY.match(path)) and method == "POST":
            self._enabled("cloudresourcemanager.googleapis.com", m.group(1))
            return 200, {"version": 3, "etag": "BwYfake=", "bindings": self.project_bindings}
        if m := _SA.match(path):
            self._enabled("iam.googleapis.com", self.project)
            email = unquote(m.group(1))
            if email not in self.service_accounts:
                raise AdminError(404, "NOT_FOUND", f"Unknown service account {email}")
            if m.group(2):
                asked = json.loads(raw or b"{}").get("permissions", [])
                granted = [p for p in asked if p != "iam.serviceAccounts.actAs"] + (
                    ["iam.serviceAccounts.actAs"]
                    if self.caller_may_act_as and "iam.serviceAccounts.actAs" in asked
                    else []
                )
                return 200, {"permissions": granted} if granted else {}
            return 200, {
                "name": f"projects/{self.project}/serviceAccounts/{email}",
                "projectId": self.project,
                "email": email,
                "uniqueId": "1" + PROJECT_NUMBER,
            }
        if m := _BUCKET_IAM.match(path):
            self._enabled("storage.googleapis.com", self.project)
            bucket = unquote(m.group(1))
            if bucket not in self.bucket_bindings:
                raise AdminError(404, "NOT_FOUND", "The specified bucket does not exist.")
            return 200, {
                "kind": "storage#policy",
                "resourceId": f"projects/_/buckets/{bucket}",
                "version": 1,
                "etag": "CAE=",
                "bindings": self.bucket_bindings[bucket],
            }
        raise AdminError(404, "NOT_FOUND", f"fake admin: no route for {method} {path}")

    def _enabled(self, service: str, project: str) -> None:
        if service in self.compute.disabled_services:
            title = TITLES.get(service, service)
            raise AdminError(
                403,
                "PERMISSION_DENIED",
                f"{title} has not been used in project {project} before or it is disabled. "
                f"Enable it by visiting https://console.developers.google.com/apis/api/{service}"
                f"/overview?project={project} then retry.",
                reason="SERVICE_DISABLED",
                service=service,
                consumer=f"projects/{PROJECT_NUMBER}",
            )

    def _service(self, name: str) -> dict:
        service = name.rsplit("/", 1)[-1]
        state = "DISABLED" if service in self.compute.disabled_services else "ENABLED"
        return {
            "name": f"projects/{PROJECT_NUMBER}/services/{service}",
            "parent": f"projects/{PROJECT_NUMBER}",
            "config": {"name": service, "title": TITLES.get(service, service)},
            "state": state,
        }
