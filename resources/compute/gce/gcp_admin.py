"""The few Google Cloud admin REST calls `lab doctor` makes, outside Compute Engine.

- Service Usage: which of the lab's APIs are enabled (``services:batchGet``);
- Resource Manager: the project's IAM policy (``projects:getIamPolicy``);
- IAM: whether a service account exists, and whether the caller may run VMs as it
  (``serviceAccounts:testIamPermissions`` for ``iam.serviceAccounts.actAs``);
- Cloud Storage: a bucket's IAM policy (``b/BUCKET/iam``).

They are plain JSON over HTTPS with the caller's credentials (no client library per
API: four calls do not pay for four packages). ``LAB_GCP_ADMIN_ENDPOINT`` points all
of them at one base URL (a fake in the tests, where the credentials' token comes
from a fake token endpoint too). An error is an ``AdminError`` with the HTTP status
and the API's reason (``SERVICE_DISABLED``, ``accessNotConfigured``,
``PERMISSION_DENIED``, ...), never a raw HTTP exception.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

ADMIN_ENDPOINT_ENV = "LAB_GCP_ADMIN_ENDPOINT"
SERVICE_USAGE = "https://serviceusage.googleapis.com"
RESOURCE_MANAGER = "https://cloudresourcemanager.googleapis.com"
IAM = "https://iam.googleapis.com"
STORAGE = "https://storage.googleapis.com"
# The reasons an API answers with when it (or the API it needs) is not enabled.
DISABLED_REASONS = frozenset({"SERVICE_DISABLED", "accessNotConfigured"})


class AdminError(RuntimeError):
    """An admin call failed: `status` is the HTTP status (0: no answer), `reason` the API's."""

    def __init__(self, what: str, status: int, reason: str, message: str):
        super().__init__(f"{what}: {status} {reason}: {message}".strip())
        self.status, self.reason, self.message = status, reason, message

    @property
    def service_disabled(self) -> bool:
        return self.reason in DISABLED_REASONS or "has not been used in project" in self.message


def error_reason(payload: Any) -> tuple[str, str]:
    """(reason, message) from a Google API error body: ErrorInfo, errors[], or status."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return "", str(payload)[:300]
    message = str(err.get("message", ""))
    for d in err.get("details") or []:
        if isinstance(d, dict) and d.get("reason"):
            return str(d["reason"]), message
    for e in err.get("errors") or []:
        if isinstance(e, dict) and e.get("reason"):
            return str(e["reason"]), message
    return str(err.get("status", "")), message


@dataclass
class AdminApi:
    """The admin calls for one project, with `credentials` (google.auth) or, for an
    ``http://`` endpoint without them, none."""

    project: str
    credentials: Any = None
    endpoint: str | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self.endpoint = self.endpoint or os.environ.get(ADMIN_ENDPOINT_ENV) or None
        if self.credentials is not None:
            from google.auth.transport.requests import AuthorizedSession

            self.session: requests.Session = AuthorizedSession(self.credentials)
        else:
            self.session = requests.Session()

    def _base(self, real: str) -> str:
        return (self.endpoint or real).rstrip("/")

    def _call(self, what: str, method: str, url: str, **kwargs: Any) -> dict:
        try:
            r = self.session.request(method, url, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as e:
            raise AdminError(what, 0, "CONNECTION", str(e)) from e
        try:
            body = r.json() if r.content else {}
        except ValueError:
            body = {"error": {"message": r.text[:300]}}
        if r.status_code >= 400:
            reason, message = error_reason(body)
            raise AdminError(what, r.status_code, reason, message)
        return body

    def service_states(self, services: list[str]) -> dict[str, str]:
        """{service: ENABLED | DISABLED} for e.g. ``compute.googleapis.com``."""
        names = [f"projects/{self.project}/services/{s}" for s in services]
        body = self._call(
            "serviceusage services.batchGet",
            "GET",
            f"{self._base(SERVICE_USAGE)}/v1/projects/{self.project}/services:batchGet",
            params=[("names", n) for n in names],
        )
        out = {}
        for svc in body.get("services") or []:
            name = str(svc.get("config", {}).get("name") or svc.get("name", "").rsplit("/", 1)[-1])
            out[name] = str(svc.get("state", "STATE_UNSPECIFIED"))
        return out

    def project_policy(self) -> dict:
        return self._call(
            "cloudresourcemanager projects.getIamPolicy",
            "POST",
            f"{self._base(RESOURCE_MANAGER)}/v1/projects/{self.project}:getIamPolicy",
            json={"options": {"requestedPolicyVersion": 3}},
        )

    def bucket_policy(self, bucket: str) -> dict:
        return self._call(
            f"storage buckets.getIamPolicy gs://{bucket}",
            "GET",
            f"{self._base(STORAGE)}/storage/v1/b/{quote(bucket, safe='')}/iam",
            params={"optionsRequestedPolicyVersion": 3},
        )

    def service_account(self, email: str) -> dict | None:
        """The service account, or None when it does not exist (404)."""
        try:
            return self._call(
                f"iam serviceAccounts.get {email}",
                "GET",
                f"{self._base(IAM)}/v1/projects/-/serviceAccounts/{quote(email, safe='@')}",
            )
        except AdminError as e:
            if e.status == 404:
                return None
            raise

    def caller_may(self, email: str, permissions: list[str]) -> list[str]:
        """Which of `permissions` the caller holds on the service account."""
        body = self._call(
            f"iam serviceAccounts.testIamPermissions {email}",
            "POST",
            f"{self._base(IAM)}/v1/projects/-/serviceAccounts/{quote(email, safe='@')}"
            ":testIamPermissions",
            json={"permissions": permissions},
        )
        return list(body.get("permissions") or [])
