"""A fake Compute Engine REST API on 127.0.0.1, for google-cloud-compute pointed at it.

It follows the real API's resource and operation shapes closely enough for the
lab's GCE code to run unchanged: ``instances`` (insert/get/list/aggregatedList/
delete/stop, label filters), ``zoneOperations`` / ``globalOperations``
(get/wait/list), ``images`` (get/getFromFamily/insert/delete), ``disks``
(insert/delete), and the real error payload
``{"error": {"code", "message", "errors": [{"reason", "message", "domain"}]}}``.

An instance "boots" by running its own ``startup-script`` with bash (``fake_vms``),
in a local subprocess whose ``GCE_METADATA_HOST`` points at a per-instance fake
metadata server serving the instance's metadata items, ``instance/preempted``,
``instance/name``, ``instance/zone`` and a service-account token; strict shims stand in
for what cannot run here (``vm_shims``), and the agent runs as a unit of the VM's fake
systemd (``fake_systemd``). Tests inject trouble:

- ``stockout(zone)``: inserts in that zone fail, as the real API reports it, either
  as an operation that finishes with ``ZONE_RESOURCE_POOL_EXHAUSTED`` (default) or
  as an HTTP error on insert (``QUOTA_EXCEEDED`` -> 403 ``quotaExceeded``);
- ``preempt(name)``: as GCE delivers it: ``instance/preempted`` turns TRUE, the
  ``shutdown-script`` runs, an ACPI shutdown stops the units (SIGTERM as their
  ``KillMode`` says), power-off (SIGKILL) after the grace period, a
  ``compute.instances.preempted`` operation is recorded, and the instance is
  TERMINATED then deleted (spot VMs here always carry ``instanceTerminationAction:
  DELETE``);
- ``crash(name)``: the agent is killed outright and the instance TERMINATED;
- ``fail_next(method, n, status)``: the next `n` calls of an API method (e.g.
  ``instances.insert``, ``zoneOperations.wait``) fail transiently (503, 429, ...),
  optionally after doing their work (``after=True``: the answer is lost).

Inserts are checked as GCE checks them (``fake_compute_checks``, from the lab's
catalog): unknown zone, machine type, accelerator or image, or a GPU count other
than the machine type's, is a 400.

``scheduling.maxRunDuration`` is enforced (the instance is deleted when it runs out).
``instances.delete`` is as strict as GCE's: the instance is STOPPING at once, and
the operation is DONE only once the instance is gone (a GET then answers 404).

This module is the server and its routing; the wire shapes are in
``fake_compute_wire``, the metadata server in ``fake_metadata``, the VM lifecycle
in ``fake_vms`` and images and disks in ``fake_compute_images``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from lab_assets_tests.fakes.fake_compute_checks import Faults, check_insert, method_name
from lab_assets_tests.fakes.fake_compute_images import ImagesAndDisks
from lab_assets_tests.fakes.fake_compute_project import ProjectAndRegions
from lab_assets_tests.fakes.fake_compute_wire import (
    API,
    ApiError,
    Operation,
    ids,
    matches_filter,
    now_rfc3339,
    send,
)
from lab_assets_tests.fakes.fake_metadata import FakeInstance, MetadataServer
from lab_assets_tests.fakes.fake_vms import REPO_ROOT, VmLifecycle

__all__ = ["REPO_ROOT", "ApiError", "FakeCompute", "FakeInstance", "MetadataServer"]


@dataclass
class Stockout:
    code: str = "ZONE_RESOURCE_POOL_EXHAUSTED"
    via: str = "operation"  # operation | http
    times: int | None = None  # None: until cleared


_INST = re.compile(
    r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/instances(?:/([^/]+))?(?:/(\w+))?$"
)
_ZOP = re.compile(
    r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/operations(?:/([^/]+))?(?:/(wait))?$"
)
_GOP = re.compile(r"^/compute/v1/projects/([^/]+)/global/operations(?:/([^/]+))?(?:/(wait))?$")
_AGG = re.compile(r"^/compute/v1/projects/([^/]+)/aggregated/instances$")
_IMG = re.compile(r"^/compute/v1/projects/([^/]+)/global/images(?:/(family)/([^/]+)|/([^/]+))?$")
_DISK = re.compile(r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/disks(?:/([^/]+))?$")


class FakeCompute(ImagesAndDisks, VmLifecycle, ProjectAndRegions):  # ImagesAndDisks._boot first
    """The fake API server; use as a context manager. `endpoint` is for `api_endpoint`."""

    def __init__(
        self,
        *,
        boot: bool = True,
        boot_delay_s: float = 0.0,
        op_delay_s: float = 0.05,
        agent_env: dict[str, str] | None = None,
        python: str | None = None,
    ):
        self.boot = boot
        self.boot_delay_s = boot_delay_s
        self.op_delay_s = op_delay_s
        self.agent_env = dict(agent_env or {})
        self.python = python or sys.executable
        self.instances: dict[tuple[str, str, str], FakeInstance] = {}
        self.deleted: list[dict] = []  # bodies of every instance deleted, in order
        self.operations: dict[str, Operation] = {}
        self.images: dict[tuple[str, str], dict] = {}
        self.disks: dict[tuple[str, str, str], dict] = {}
        self._init_images()  # public images, filesystem ids
        self.reset_project()  # quotas, enabled APIs (fake_compute_project)
        self.stockouts: dict[str, Stockout] = {}
        self.faults = Faults()
        self.networks: set[str] = {"default"}  # the project's networks and subnetworks
        self.subnetworks: set[str] = set()
        self.calls: list[tuple[str, str]] = []  # (method, path) of every API call
        # (method, path, Authorization header or None) of every API call
        self.authorized: list[tuple[str, str, str | None]] = []
        self.inserted: list[dict] = []  # every instance body inserted successfully
        # (time, +1 inserted / -1 gone, instance body) in order: who was alive when
        self.history: list[tuple[float, int, dict]] = []
        self.lock = threading.RLock()
        self.on_boot: list[Callable[[FakeInstance], None]] = []
        self.boot_failures: dict[str, str] = {}  # shim command prefix -> error (fake_vms)
        self.vm_env: dict[str, str] = {}  # added to the next VMs' environment (fake_vms)
        self._tmp = Path(tempfile.mkdtemp(prefix="fake-gce-"))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _dispatch(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                    outer._check_auth(method, self.path, self.headers.get("Authorization"))
                    status, out = outer._handle(method, self.path, body)
                except ApiError as e:
                    status, out = e.status, e.payload()
                send(self, status, out, "application/json")

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

            def do_DELETE(self):
                self._dispatch("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeCompute:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self.lock:
            insts = list(self.instances.values())
        for inst in insts:
            self._stop_agent(inst, grace_s=0)
            if inst.metadata_server:
                inst.metadata_server.close()
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    # -- fault injection ------------------------------------------------------------------

    def stockout(
        self,
        zone: str,
        code: str = "ZONE_RESOURCE_POOL_EXHAUSTED",
        via: str = "operation",
        times: int | None = None,
    ) -> None:
        """Inserts in `zone` fail with `code` (`via` an operation error or an HTTP error)."""
        self.stockouts[zone] = Stockout(code, via, times)

    def clear_stockouts(self) -> None:
        self.stockouts.clear()

    def fail_next(
        self, method: str, n: int = 1, status: int = 503, reason: str = "", after: bool = False
    ) -> None:
        """The next `n` calls of `method` (``instances.insert``, ``instances.get``,
        ``zoneOperations.wait``, ...) fail with `status` (503 ``backendError``, 429
        ``rateLimitExceeded``, ...); with `after`, each is carried out and its answer lost."""
        self.faults.fail_next(method, n, status, reason, after)

    def clear_faults(self) -> None:
        self.stockouts.clear()
        self.faults.clear()
        self.boot_failures.clear()
        self.vm_env.clear()

    def find(self, name: str) -> FakeInstance | None:
        with self.lock:
            for (_, _, n), inst in self.instances.items():
                if n == name:
                    return inst
        return None

    def live(self) -> list[FakeInstance]:
        with self.lock:
            return list(self.instances.values())

    def peak_alive(self, where: Callable[[dict], bool] = lambda body: True) -> int:
        """The most instances (of those whose body passes `where`) that existed at once.

        Exact, from `history`: an instance counts from its insert until it is gone
        (deleted, or preempted / stopped by ``maxRunDuration`` with DELETE), STOPPING
        included."""
        alive = peak = 0
        with self.lock:
            for _, change, body in self.history:
                if where(body):
                    alive += change
                    peak = max(peak, alive)
        return peak

    def wait_for(self, pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.05)
        raise TimeoutError(f"fake compute: timed out waiting for {what or pred}")

    # -- request handling -----------------------------------------------------------------

    def _check_auth(self, method: str, path: str, auth: str | None) -> None:
        """A bearer token must be one an instance's metadata server issued (a VM calling the
        API as its service account); the launcher's anonymous calls carry none."""
        with self.lock:
            self.authorized.append((method, urlparse(path).path, auth))
            if auth is None:
                return
            tokens = {f"Bearer {i.token}" for i in self.instances.values()}
        if auth not in tokens:
            raise ApiError(401, "authError", "Request had invalid authentication credentials.")

    def _handle(self, method: str, raw_path: str, body: dict) -> tuple[int, dict]:
        url = urlparse(raw_path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        with self.lock:
            self.calls.append((method, path))
        fault = self.faults.take(method_name(method, path))
        if fault is not None and not fault.after:
            raise self.faults.error(fault)
        out = self._route(method, path, q, body)
        if fault is not None:  # the work is done; the answer is lost
            raise self.faults.error(fault)
        return out

    def _route(self, method: str, path: str, q: dict, body: dict) -> tuple[int, dict]:
        if (project_answer := self._project_route(method, path)) is not None:
            return project_answer
        if m := _INST.match(path):
            project, zone, name, verb = m.groups()
            if name is None and method == "POST":
                return 200, self._insert_instance(project, zone, body)
            if name is None and method == "GET":
                items = [
                    i.to_json()
                    for (p, z, _), i in sorted(self.instances.items())
                    if p == project and z == zone and matches_filter(i.to_json(), q.get("filter"))
                ]
                return 200, {"kind": "compute#instanceList", "items": items, "id": "x"}
            inst = self.instances.get((project, zone, name))
            if inst is None:
                raise ApiError(
                    404,
                    "notFound",
                    f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found",
                )
            if method == "GET" and verb is None:
                return 200, inst.to_json()
            if method == "GET" and verb == "serialPort":
                return 200, self.serial_port_output(inst, q)
            if method == "DELETE":
                # As on GCE: STOPPING at once, the operation DONE once the instance is gone.
                op = self._record_op(project, zone, "delete", inst, pending=True)
                inst.status = "STOPPING"
                threading.Thread(target=self._delete, args=(inst, op["name"]), daemon=True).start()
                return 200, op
            if method == "POST" and verb == "stop":
                op = self._record_op(project, zone, "stop", inst)
                self._stop_agent(inst, grace_s=1.0)
                inst.status = "TERMINATED"
                return 200, op
        if m := _AGG.match(path):
            project = m.group(1)
            items: dict[str, dict] = {}
            for (p, z, _), i in sorted(self.instances.items()):
                if p == project and matches_filter(i.to_json(), q.get("filter")):
                    items.setdefault(f"zones/{z}", {"instances": []})["instances"].append(
                        i.to_json()
                    )
            return 200, {"kind": "compute#instanceAggregatedList", "items": items, "id": "x"}
        if m := _ZOP.match(path):
            project, zone, name, wait = m.groups()
            if name is None:
                ops = [
                    o.view()
                    for o in self.operations.values()
                    if o.body.get("zone", "").endswith(f"/projects/{project}/zones/{zone}")
                    and matches_filter(o.body, q.get("filter"))
                ]
                return 200, {"kind": "compute#operationList", "items": ops, "id": "x"}
            return 200, self._get_op(name, wait is not None)
        if m := _GOP.match(path):
            project, name, wait = m.groups()
            return 200, self._get_op(name, wait is not None)
        if m := _IMG.match(path):
            return self._images(method, m, body)
        if m := _DISK.match(path):
            return self._disks(method, m, body)
        raise ApiError(404, "notFound", f"fake compute: no route for {method} {path}")

    def _get_op(self, name: str, wait: bool) -> dict:
        op = self.operations.get(name)
        if op is None:
            raise ApiError(404, "notFound", f"The resource 'operations/{name}' was not found")
        if wait:
            op.wait(30.0)
        return op.view()

    def _record_op(
        self,
        project: str,
        zone: str | None,
        op_type: str,
        target: FakeInstance | dict | None,
        error: dict | None = None,
        system: bool = False,
        target_link: str | None = None,
        pending: bool = False,
    ) -> dict:
        """Record an operation; one `pending` is DONE only after `self.operations[name].finish()`."""
        name = f"operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
        if isinstance(target, FakeInstance):
            target_link = f"{API}/projects/{project}/zones/{zone}/instances/{target.name}"
            target_id = str(target.body.get("id", ""))
        else:
            target_id = str((target or {}).get("id", ""))
        where = f"projects/{project}/zones/{zone}" if zone else f"projects/{project}/global"
        body = {
            "kind": "compute#operation",
            "id": str(next(ids)),
            "name": name,
            "operationType": op_type,
            "targetLink": target_link or "",
            **({"targetId": target_id} if target_id else {}),
            "status": "RUNNING",
            "progress": 0,
            "insertTime": now_rfc3339(),
            "startTime": now_rfc3339(),
            "selfLink": f"{API}/{where}/operations/{name}",
            "user": "system" if system else "lab-test@example.com",
        }
        if zone:
            body["zone"] = f"{API}/projects/{project}/zones/{zone}"
        if error:
            body["error"] = {"errors": [error]}
            body["httpErrorStatusCode"] = 503
            body["httpErrorMessage"] = "SERVICE UNAVAILABLE"
        with self.lock:
            self.operations[name] = Operation(body, time.time() + self.op_delay_s, pending)
        return dict(body)

    def _insert_instance(self, project: str, zone: str, body: dict) -> dict:
        name = body.get("name", "")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'.")
        for k, v in (body.get("labels") or {}).items():
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", k) or not re.fullmatch(
                r"[a-z0-9_-]{0,63}", v
            ):
                raise ApiError(
                    400, "invalid", f"Invalid value for field 'resource.labels': '{k}={v}'."
                )
        check_insert(zone, body, self.images, frozenset(self.networks), frozenset(self.subnetworks))
        link = f"{API}/projects/{project}/zones/{zone}/instances/{name}"
        stock = self.stockouts.get(zone)
        if stock is not None:
            if stock.times is not None:
                stock.times -= 1
                if stock.times <= 0:
                    del self.stockouts[zone]
            msg = (
                f"The zone 'projects/{project}/zones/{zone}' does not have enough resources "
                "available to fulfill the request.  Try a different zone, or try again later."
            )
            if stock.code == "QUOTA_EXCEEDED":
                msg = f"Quota 'GPUS_ALL_REGIONS' exceeded.  Limit: 0.0 globally (zone {zone})."
            if stock.via == "http":
                reason = "quotaExceeded" if stock.code == "QUOTA_EXCEEDED" else stock.code
                status = 403 if stock.code == "QUOTA_EXCEEDED" else 503
                raise ApiError(status, reason, msg, domain="usageLimits")
            return self._record_op(
                project,
                zone,
                "insert",
                None,
                error={"code": stock.code, "message": msg},
                target_link=link,
            )
        with self.lock:
            if (project, zone, name) in self.instances:
                raise ApiError(
                    409, "alreadyExists", f"The resource '{link.split('/v1/')[1]}' already exists"
                )
            full = json.loads(json.dumps(body))
            full.update(
                {
                    "kind": "compute#instance",
                    "id": str(next(ids)),
                    "selfLink": link,
                    "zone": f"{API}/projects/{project}/zones/{zone}",
                    "creationTimestamp": now_rfc3339(),
                }
            )
            inst = FakeInstance(project, zone, full)
            self.instances[(project, zone, name)] = inst
            self.inserted.append(full)
            self.history.append((time.time(), +1, full))
            for d in full.get("disks", []):
                dname = (d.get("initializeParams") or {}).get("diskName") or name
                if d.get("boot"):
                    self.disks[(project, zone, dname)] = {"name": dname, "users": [link]}
        op = self._record_op(project, zone, "insert", inst)
        threading.Thread(target=self._boot, args=(inst,), daemon=True).start()
        return op
