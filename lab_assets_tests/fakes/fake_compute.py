"""A fake Compute Engine REST API on 127.0.0.1, for google-cloud-compute pointed at it.

It follows the real API's resource and operation shapes closely enough for the
lab's GCE code to run unchanged: ``instances`` (insert/get/list/aggregatedList/
delete/stop, label filters), ``zoneOperations`` / ``globalOperations``
(get/wait/list), ``images`` (get/getFromFamily/insert/delete), ``disks``
(insert/delete), and the real error payload
``{"error": {"code", "message", "errors": [{"reason", "message", "domain"}]}}``.

An instance "boots" by running the lab's agent (``python -m resources.remote.agent``)
in a local subprocess whose ``GCE_METADATA_HOST`` points at a per-instance fake
metadata server serving the instance's metadata items, ``instance/preempted``,
``instance/name``, ``instance/zone``. Tests inject trouble:

- ``stockout(zone)``: inserts in that zone fail, as the real API reports it, either
  as an operation that finishes with ``ZONE_RESOURCE_POOL_EXHAUSTED`` (default) or
  as an HTTP error on insert (``QUOTA_EXCEEDED`` -> 403 ``quotaExceeded``);
- ``preempt(name)``: ``instance/preempted`` turns TRUE, SIGTERM to the agent's
  processes, SIGKILL after a grace period, a ``compute.instances.preempted``
  operation is recorded, and the instance is TERMINATED then deleted (spot VMs
  here always carry ``instanceTerminationAction: DELETE``);
- ``crash(name)``: the agent is killed outright and the instance TERMINATED.

``scheduling.maxRunDuration`` is enforced (the instance is deleted when it runs out).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

REPO_ROOT = Path(__file__).resolve().parents[2]
API = "https://www.googleapis.com/compute/v1"
_ids = itertools.count(1000)


def _now_rfc3339() -> str:
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
class Stockout:
    code: str = "ZONE_RESOURCE_POOL_EXHAUSTED"
    via: str = "operation"  # operation | http
    times: int | None = None  # None: until cleared


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


@dataclass
class Operation:
    body: dict
    done_at: float

    def view(self) -> dict:
        body = dict(self.body)
        if time.time() >= self.done_at:
            body["status"] = "DONE"
            body["progress"] = 100
            body.setdefault("endTime", _now_rfc3339())
        return body


class MetadataServer:
    """The per-instance metadata server the agent reads (``GCE_METADATA_HOST``)."""

    def __init__(self, fake: FakeCompute, inst: FakeInstance):
        self.fake, self.inst = fake, inst
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                outer._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Metadata-Flavor") != "Google":
            return _send(h, 403, "Missing Metadata-Flavor:Google header.", "text/plain")
        url = urlparse(h.path)
        q = parse_qs(url.query)
        path = url.path.removeprefix("/computeMetadata/v1/")
        inst = self.inst
        if path == "instance/preempted":
            if q.get("wait_for_change") == ["true"]:
                timeout = float(q.get("timeout_sec", ["30"])[0])
                with inst.changed:
                    inst.changed.wait_for(lambda: inst.preempted, timeout=timeout)
            return _send(h, 200, "TRUE" if inst.preempted else "FALSE", "text/plain")
        if path == "instance/name":
            return _send(h, 200, inst.name, "text/plain")
        if path == "instance/zone":
            return _send(h, 200, f"projects/123456789/zones/{inst.zone}", "text/plain")
        if path == "instance/id":
            return _send(h, 200, str(inst.body.get("id", "0")), "text/plain")
        if path == "project/project-id":
            return _send(h, 200, inst.project, "text/plain")
        if path.startswith("instance/attributes/"):
            key = path.removeprefix("instance/attributes/")
            items = inst.metadata_items()
            if key in items:
                return _send(h, 200, items[key], "text/plain")
        return _send(h, 404, "not found", "text/plain")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _send(h: BaseHTTPRequestHandler, status: int, body: str | dict, ctype: str) -> None:
    data = (json.dumps(body) if isinstance(body, dict) else body).encode()
    try:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the client (an agent being killed) went away


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


class FakeCompute:
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
        self.stockouts: dict[str, Stockout] = {}
        self.calls: list[tuple[str, str]] = []  # (method, path) of every API call
        self.inserted: list[dict] = []  # every instance body inserted successfully
        self.lock = threading.RLock()
        self.on_boot: list[Callable[[FakeInstance], None]] = []
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
                    status, out = outer._handle(method, self.path, body)
                except ApiError as e:
                    status, out = e.status, e.payload()
                _send(self, status, out, "application/json")

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

    def find(self, name: str) -> FakeInstance | None:
        with self.lock:
            for (_, _, n), inst in self.instances.items():
                if n == name:
                    return inst
        return None

    def live(self) -> list[FakeInstance]:
        with self.lock:
            return list(self.instances.values())

    def preempt(self, name: str, grace_s: float = 5.0, wait: bool = False) -> None:
        """Spot preemption: preempted=TRUE, SIGTERM, SIGKILL after `grace_s`, then deleted."""
        inst = self.find(name)
        if inst is None:
            return
        with inst.changed:
            inst.preempted = True
            inst.changed.notify_all()
        self._record_op(inst.project, inst.zone, "compute.instances.preempted", inst, system=True)
        inst.status = "STOPPING"

        def finish():
            self._stop_agent(inst, grace_s=grace_s)
            inst.status = "TERMINATED"
            action = inst.body.get("scheduling", {}).get("instanceTerminationAction", "STOP")
            if action == "DELETE":
                self._remove(inst)

        t = threading.Thread(target=finish, daemon=True)
        t.start()
        if wait:
            t.join()

    def crash(self, name: str) -> None:
        """The VM dies under the agent (host error): processes killed, instance TERMINATED."""
        inst = self.find(name)
        if inst is None:
            return
        self._stop_agent(inst, grace_s=0)
        inst.status = "TERMINATED"

    def wait_for(self, pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.05)
        raise TimeoutError(f"fake compute: timed out waiting for {what or pred}")

    # -- request handling -----------------------------------------------------------------

    def _handle(self, method: str, raw_path: str, body: dict) -> tuple[int, dict]:
        url = urlparse(raw_path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        with self.lock:
            self.calls.append((method, path))
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
            if method == "DELETE":
                op = self._record_op(project, zone, "delete", inst)
                threading.Thread(target=self._delete, args=(inst,), daemon=True).start()
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
            time.sleep(max(0.0, min(op.done_at - time.time(), 30.0)))
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
    ) -> dict:
        name = f"operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
        if isinstance(target, FakeInstance):
            target_link = f"{API}/projects/{project}/zones/{zone}/instances/{target.name}"
            target_id = str(target.body.get("id", ""))
        else:
            target_id = str((target or {}).get("id", ""))
        where = f"projects/{project}/zones/{zone}" if zone else f"projects/{project}/global"
        body = {
            "kind": "compute#operation",
            "id": str(next(_ids)),
            "name": name,
            "operationType": op_type,
            "targetLink": target_link or "",
            **({"targetId": target_id} if target_id else {}),
            "status": "RUNNING",
            "progress": 0,
            "insertTime": _now_rfc3339(),
            "startTime": _now_rfc3339(),
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
            self.operations[name] = Operation(body, time.time() + self.op_delay_s)
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
                    "id": str(next(_ids)),
                    "selfLink": link,
                    "zone": f"{API}/projects/{project}/zones/{zone}",
                    "creationTimestamp": _now_rfc3339(),
                }
            )
            inst = FakeInstance(project, zone, full)
            self.instances[(project, zone, name)] = inst
            self.inserted.append(full)
            for d in full.get("disks", []):
                dname = (d.get("initializeParams") or {}).get("diskName") or name
                if d.get("boot"):
                    self.disks[(project, zone, dname)] = {"name": dname, "users": [link]}
        op = self._record_op(project, zone, "insert", inst)
        threading.Thread(target=self._boot, args=(inst,), daemon=True).start()
        return op

    def _boot(self, inst: FakeInstance) -> None:
        time.sleep(self.op_delay_s + self.boot_delay_s)
        with self.lock:
            if (inst.project, inst.zone, inst.name) not in self.instances:
                return
            inst.status = "RUNNING"
        duration = (inst.body.get("scheduling") or {}).get("maxRunDuration")
        if duration:
            limit = float(duration.get("seconds", 0)) + float(duration.get("nanos", 0)) / 1e9
            timer = threading.Timer(limit, self._dead_man, args=(inst,))
            timer.daemon = True
            timer.start()
        for hook in self.on_boot:
            hook(inst)
        if not self.boot:
            return
        inst.metadata_server = MetadataServer(self, inst)
        inst.home = self._tmp / inst.name
        inst.home.mkdir(parents=True, exist_ok=True)
        devices = inst.home / "dev"
        devices.mkdir(exist_ok=True)
        for d in inst.body.get("disks", []):
            if not d.get("boot") and d.get("deviceName"):
                # An attached data disk shows up as a (small) block device file.
                src = self.disks.get((inst.project, inst.zone, d["source"].rsplit("/", 1)[-1]))
                (devices / f"google-{d['deviceName']}").write_bytes(
                    (src or {}).get("_content", b"\0" * 4096)
                )
        env = {
            **os.environ,
            **self.agent_env,
            "GCE_METADATA_HOST": inst.metadata_server.host,
            "LAB_AGENT_HOME": str(inst.home / "lab"),
            "LAB_AGENT_DEVICE_ROOT": str(devices),
            "PYTHONUNBUFFERED": "1",
        }
        log = open(inst.home / "serial.log", "ab")
        with self.lock:
            if (inst.project, inst.zone, inst.name) not in self.instances:
                return
            inst.proc = subprocess.Popen(
                [self.python, "-m", "resources.remote.agent"],
                cwd=str(REPO_ROOT),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.close()

    def serial_output(self, name: str) -> str:
        p = self._tmp / name / "serial.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def _dead_man(self, inst: FakeInstance) -> None:
        self._record_op(inst.project, inst.zone, "compute.instances.stop", inst, system=True)
        self._delete(inst)

    def _stop_agent(self, inst: FakeInstance, grace_s: float) -> None:
        proc = inst.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def _delete(self, inst: FakeInstance) -> None:
        inst.status = "STOPPING"
        self._stop_agent(inst, grace_s=1.0)
        self._remove(inst)

    def _remove(self, inst: FakeInstance) -> None:
        with self.lock:
            if self.instances.pop((inst.project, inst.zone, inst.name), None) is None:
                return
            self.deleted.append(inst.to_json())
            for d in inst.body.get("disks", []):
                if d.get("boot") and d.get("autoDelete", True):
                    dname = (d.get("initializeParams") or {}).get("diskName") or inst.name
                    self.disks.pop((inst.project, inst.zone, dname), None)
        inst.status = "TERMINATED"
        if inst.metadata_server:
            inst.metadata_server.close()

    # -- images and disks -----------------------------------------------------------------

    def _images(self, method: str, m: re.Match, body: dict) -> tuple[int, dict]:
        project, fam_kw, family, name = m.groups()
        if fam_kw:
            live = [
                i
                for (p, _), i in self.images.items()
                if p == project and i.get("family") == family and i.get("status") == "READY"
            ]
            if not live:
                raise ApiError(
                    404,
                    "notFound",
                    f"The resource 'projects/{project}/global/images/family/{family}' was not found",
                )
            return 200, max(live, key=lambda i: i["creationTimestamp"])
        if name is None and method == "POST":
            iname = body.get("name", "")
            if (project, iname) in self.images:
                raise ApiError(409, "alreadyExists", f"image {iname} already exists")
            if src := body.get("sourceDisk"):
                dm = re.search(r"projects/([^/]+)/zones/([^/]+)/disks/([^/]+)$", src)
                disk = self.disks.get(dm.groups()) if dm else None
                if disk is None:
                    raise ApiError(404, "notFound", f"The resource '{src}' was not found")
                users = [self._by_link(u) for u in disk.get("users", [])]
                if any(
                    u is not None and u.status == "RUNNING" for u in users
                ) and "forceCreate=true" not in str(body):
                    raise ApiError(
                        400,
                        "resourceInUseByAnotherResource",
                        f"The disk resource '{src}' is already being used; stop the instance",
                    )
            elif not (body.get("rawDisk") or {}).get("source"):
                raise ApiError(400, "required", "Required field 'sourceDisk' or 'rawDisk' not set")
            image = {
                **body,
                "kind": "compute#image",
                "id": str(next(_ids)),
                "status": "READY",
                "creationTimestamp": _now_rfc3339(),
                "selfLink": f"{API}/projects/{project}/global/images/{iname}",
                "diskSizeGb": str(body.get("diskSizeGb") or 10),
            }
            self.images[(project, iname)] = image
            return 200, self._record_op(
                project, None, "insert", image, target_link=image["selfLink"]
            )
        image = self.images.get((project, name or ""))
        if image is None:
            raise ApiError(
                404,
                "notFound",
                f"The resource 'projects/{project}/global/images/{name}' was not found",
            )
        if method == "GET":
            return 200, image
        if method == "DELETE":
            del self.images[(project, name)]
            return 200, self._record_op(
                project, None, "delete", image, target_link=image["selfLink"]
            )
        raise ApiError(405, "badRequest", f"{method} not supported on images")

    def _by_link(self, link: str) -> FakeInstance | None:
        m = re.search(r"projects/([^/]+)/zones/([^/]+)/instances/([^/]+)$", link)
        return self.instances.get(m.groups()) if m else None

    def _disks(self, method: str, m: re.Match, body: dict) -> tuple[int, dict]:
        project, zone, name = m.groups()
        if name is None and method == "POST":
            dname = body["name"]
            link = f"{API}/projects/{project}/zones/{zone}/disks/{dname}"
            disk = {**body, "kind": "compute#disk", "id": str(next(_ids)), "selfLink": link}
            disk["status"] = "READY"
            # A disk made from an image holds that image's bytes (a marker, here).
            disk["_content"] = f"disk from {body.get('sourceImage', 'blank')}\n".encode().ljust(
                8192, b"\0"
            )
            self.disks[(project, zone, dname)] = disk
            return 200, self._record_op(project, zone, "insert", disk, target_link=link)
        disk = self.disks.get((project, zone, name or ""))
        if disk is None:
            raise ApiError(404, "notFound", f"disk {name} not found")
        if method == "GET":
            return 200, {k: v for k, v in disk.items() if not k.startswith("_")}
        if method == "DELETE":
            del self.disks[(project, zone, name)]
            return 200, self._record_op(project, zone, "delete", disk, target_link=disk["selfLink"])
        raise ApiError(405, "badRequest", f"{method} not supported on disks")
