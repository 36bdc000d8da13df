"""The agent that runs on a lab VM: reads its instructions, runs the step, streams it to GCS.

It must start before the lab's code is installed on the VM, so it imports only the
standard library and google-cloud-storage (no gcloud, no gsutil). The startup
script fetches this file from the instance metadata (attribute ``lab-agent``) and
runs it; its instructions are JSON in the attribute ``lab-launch``, read from the
metadata server (``http://$GCE_METADATA_HOST/computeMetadata/v1/...`` with header
``Metadata-Flavor: Google``; the host defaults to ``metadata.google.internal``).

Modes (``mode`` in the instructions):

- ``step``: download the launch bundle from GCS (a wheel of the orchestrator's
  working tree, the experiment file, the pickled ``StepRunRef``), install the wheel
  with pip (``bundle_install: pip``; the fake Compute Engine in the tests uses
  ``skip``, which runs the step with the agent's own interpreter and environment),
  fetch the step's checkpoints, and run ``python -m resources.remote.step_worker``. While
  it runs, the Dagster events file and the worker's stdout/stderr lines are
  uploaded as numbered chunk objects (GCS objects are immutable, so a stream is a
  sequence of objects; a chunk is written only after the one before it exists, so
  a reader that lists the prefix never sees a gap), complete checkpoints are
  mirrored to GCS, and ``status.json`` is rewritten as a heartbeat. On preemption
  (metadata ``instance/preempted`` turns TRUE, or SIGTERM) the worker is sent
  SIGTERM so it can checkpoint, given ``grace_s`` to exit, its checkpoints are
  uploaded, and the status says ``preempted``.
- ``image-build``: install the bundle with its dependencies, run the health check
  (torch imports, CUDA works, the base model loads) and upload the report.
- ``export-disk``: stream an attached disk to GCS as ``disk.tar.gz`` holding
  ``disk.raw``, the format ``images.insert`` with ``rawDisk.source`` restores from.

The launch layout in GCS and every name shared with the launcher live in
``resources.remote.protocol``, which ships beside this file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from resources.remote.protocol import (
    BUNDLE_DIR,
    CHECKPOINT_DIR_ENV,
    CHECKPOINTS_DIR,
    DEVICE_ROOT_ENV,
    EVENTS_DIR,
    EXPERIMENT_ENV,
    EXPERIMENT_FILE,
    HOME_ENV,
    INSTRUCTIONS_KEY,
    LAUNCH_INFO_ENV,
    LOGS_DIR,
    METADATA_HOST_ENV,
    PREEMPTIBLE_ENV,
    SCRATCH_ENV,
    STATUS_FILE,
    STEP_RUN_REF,
    attempt_prefix,
    chunk_name,
    make_storage_client,
    parse_gs_uri,
)

# -- metadata server ----------------------------------------------------------------------


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


# -- streams to GCS -----------------------------------------------------------------------


class ChunkStream:
    """An append-only stream stored as numbered objects ``prefix/00000000.suffix``, ..."""

    def __init__(self, bucket, prefix: str, suffix: str):
        self.bucket, self.prefix, self.suffix = bucket, prefix, suffix
        self.next_index = 0
        self._lock = threading.Lock()

    def append(self, data: bytes, content_type: str = "text/plain") -> None:
        if not data:
            return
        with self._lock:
            name = chunk_name(self.prefix, self.next_index, self.suffix)
            _retry(lambda: self.bucket.blob(name).upload_from_string(data, content_type))
            self.next_index += 1


class LineBuffer:
    """Lines written by several threads, shipped as one chunk per flush."""

    def __init__(self, stream: ChunkStream, echo=None):
        self.stream = stream
        self.echo = echo
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def write_line(self, line: str) -> None:
        if self.echo is not None:
            self.echo.write(line + "\n")
            self.echo.flush()
        with self._lock:
            self._lines.append(line)

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        if lines:
            self.stream.append(("\n".join(lines) + "\n").encode())


class FileTail:
    """Ships the complete lines appended to a local file since the last flush."""

    def __init__(self, path: Path, stream: ChunkStream):
        self.path, self.stream = path, stream
        self._offset = 0
        self._lock = threading.Lock()

    def flush(self) -> None:
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            end = data.rfind(b"\n") + 1  # only whole lines: an event is one line
            if end:
                self.stream.append(data[:end], "application/x-ndjson")
                self._offset += end


def _file_key(p: Path) -> tuple[float, int]:
    st = p.stat()
    return (st.st_mtime, st.st_size)


def _retry(fn, tries: int = 5):
    for i in range(tries):
        try:
            return fn()
        except Exception:
            if i == tries - 1:
                raise
            time.sleep(0.5 * 2**i)


# -- checkpoints --------------------------------------------------------------------------


class CheckpointSync:
    """Mirrors complete checkpoints between a local directory and a GCS prefix.

    A top-level sub-directory is a checkpoint; it is complete once it holds
    ``marker`` (the HF Trainer writes ``trainer_state.json`` last). Complete ones
    are uploaded with the marker last, so a reader of GCS also never sees a
    half-uploaded checkpoint as complete; ones deleted locally (the Trainer's
    ``save_total_limit``) are deleted from GCS after newer ones are up. Top-level
    files (e.g. a note of which run owns the directory) are uploaded when changed.
    """

    def __init__(self, bucket, prefix: str, local: Path, marker: str = "trainer_state.json"):
        self.bucket, self.prefix, self.local, self.marker = (
            bucket,
            prefix.rstrip("/"),
            local,
            marker,
        )
        self._synced: dict[str, Any] = {}  # dir -> marker mtime; "/file" -> (mtime, size)
        self._lock = threading.Lock()

    def download(self) -> list[str]:
        """Fetch the complete checkpoints in GCS; returns their names."""
        self.local.mkdir(parents=True, exist_ok=True)
        by_dir: dict[str, list] = {}
        for blob in self.bucket.list_blobs(prefix=self.prefix + "/"):
            rel = blob.name[len(self.prefix) + 1 :]
            top, sep, _ = rel.partition("/")
            if sep:
                by_dir.setdefault(top, []).append((rel, blob))
            else:
                dest = self.local / rel
                blob.download_to_filename(str(dest))
                self._synced[f"/{rel}"] = _file_key(dest)
        got = []
        for top, blobs in sorted(by_dir.items()):
            if not any(rel == f"{top}/{self.marker}" for rel, _ in blobs):
                continue  # incomplete upload: never resume from it
            for rel, blob in sorted(blobs, key=lambda rb: rb[0].endswith(self.marker)):
                dest = self.local / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                blob.download_to_filename(str(dest))
            marker = self.local / top / self.marker
            self._synced[top] = marker.stat().st_mtime
            got.append(top)
        return got

    def upload(self) -> list[str]:
        """Upload checkpoints completed since the last call; returns their names."""
        with self._lock:
            if not self.local.is_dir():
                return []
            done = []
            present = set()
            for f in sorted(p for p in self.local.iterdir() if p.is_file()):
                key = _file_key(f)
                if self._synced.get(f"/{f.name}") != key:
                    name = f"{self.prefix}/{f.name}"
                    _retry(lambda f=f, name=name: self.bucket.blob(name).upload_from_filename(f))
                    self._synced[f"/{f.name}"] = key
            for d in sorted(p for p in self.local.iterdir() if p.is_dir()):
                marker = d / self.marker
                if not marker.is_file():
                    continue
                present.add(d.name)
                mtime = marker.stat().st_mtime
                if self._synced.get(d.name) == mtime:
                    continue
                files = sorted(p for p in d.rglob("*") if p.is_file() and p != marker)
                for p in [*files, marker]:
                    name = f"{self.prefix}/{p.relative_to(self.local).as_posix()}"
                    _retry(lambda p=p, name=name: self.bucket.blob(name).upload_from_filename(p))
                self._synced[d.name] = mtime
                done.append(d.name)
            for gone in {k for k in self._synced if not k.startswith("/")} - present:
                for blob in self.bucket.list_blobs(prefix=f"{self.prefix}/{gone}/"):
                    blob.delete()
                del self._synced[gone]
            return done


# -- the step mode ------------------------------------------------------------------------


class StepAgent:
    def __init__(self, instr: dict[str, Any], md: Metadata, home: Path):
        self.instr = instr
        self.md = md
        self.home = home
        self.client = make_storage_client()
        bucket_name, self.launch_prefix = parse_gs_uri(instr["launch_uri"])
        self.bucket = self.client.bucket(bucket_name)
        self.attempt = int(instr.get("attempt", 1))
        self.prefix = attempt_prefix(self.launch_prefix, self.attempt)
        self.flush_s = float(instr.get("flush_interval_s", 2.0))
        self.heartbeat_s = float(instr.get("heartbeat_s", 10.0))
        self.grace_s = float(instr.get("grace_s", 20.0))
        self.logs = LineBuffer(
            ChunkStream(self.bucket, f"{self.prefix}/{LOGS_DIR}", "txt"), sys.stdout
        )
        self.preempted = threading.Event()
        self.stopping = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.state = "starting"
        self.stop_reason = ""
        self._status_lock = threading.Lock()

    def log(self, msg: str) -> None:
        self.logs.write_line(f"[agent] {msg}")

    def write_status(self, state: str, **extra: Any) -> None:
        with self._status_lock:
            self.state = state
            body = {"state": state, "attempt": self.attempt, "t": time.time(), **extra}
            name = f"{self.prefix}/{STATUS_FILE}"
            _retry(
                lambda: self.bucket.blob(name).upload_from_string(
                    json.dumps(body), "application/json"
                )
            )

    def _download(self, rel: str, dest: Path) -> bool:
        blob = self.bucket.blob(f"{self.launch_prefix}/{rel}")
        if not blob.exists():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(dest))
        return True

    def _install_bundle(self, work: Path) -> None:
        mode = self.instr.get("bundle_install", "pip")
        if mode == "skip":
            self.log("bundle_install=skip: running the step with the agent's own environment")
            return
        wheels = [
            b
            for b in self.bucket.list_blobs(prefix=f"{self.launch_prefix}/{BUNDLE_DIR}/")
            if b.name.endswith(".whl")
        ]
        if not wheels:
            raise RuntimeError("the launch bundle holds no wheel")
        local = work / BUNDLE_DIR / wheels[0].name.rsplit("/", 1)[-1]
        local.parent.mkdir(parents=True, exist_ok=True)
        wheels[0].download_to_filename(str(local))
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        # Dependencies first (a pre-baked image has them: quick), then the lab's own
        # code replaced even though its version number has not changed.
        for extra in ([], ["--no-deps", "--force-reinstall"]):
            self.log(f"pip install {' '.join(extra)} {local.name}")
            self._run_logged([*pip, *extra, str(local)], cwd=work)

    def _run_logged(self, argv: list[str], cwd: Path) -> None:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            self.logs.write_line(line.rstrip("\n"))
        if proc.wait() != 0:
            raise RuntimeError(f"{argv[:4]} exited with {proc.returncode}")

    def _flusher(self, tail: FileTail, ckpt: CheckpointSync | None) -> None:
        last_beat = 0.0
        ckpt_every = float(self.instr.get("checkpoint_sync_s", 10.0))
        last_ckpt = time.time()
        while not self.stopping.wait(self.flush_s):
            try:
                tail.flush()
                self.logs.flush()
                now = time.time()
                if ckpt is not None and now - last_ckpt >= ckpt_every:
                    for name in ckpt.upload():
                        self.log(f"checkpoint {name} uploaded")
                    last_ckpt = now
                # A heartbeat while installing too (pip on a bare image takes minutes).
                if now - last_beat >= self.heartbeat_s and self.state in ("starting", "running"):
                    self.write_status(self.state)
                    last_beat = now
            except Exception as e:  # keep streaming; the final flush reports for good
                print(f"[agent] flush failed: {e}", file=sys.stderr)

    def _watch_preemption(self) -> None:
        while not self.stopping.is_set() and not self.preempted.is_set():
            try:
                if self.md.wait_preempted(timeout_s=int(self.instr.get("preempted_poll_s", 30))):
                    self.on_preempted("metadata instance/preempted is TRUE")
                    return
            except Exception:
                time.sleep(1.0)

    def on_preempted(self, why: str) -> None:
        if self.preempted.is_set():
            return
        self.stop_reason = why
        self.preempted.set()
        self.log(f"stop requested ({why}); asking the step to checkpoint and stop")
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

            def deadline():
                try:
                    proc.wait(timeout=self.grace_s)
                except subprocess.TimeoutExpired:
                    self.log(f"step still running after {self.grace_s:.0f}s; killing it")
                    proc.kill()

            threading.Thread(target=deadline, daemon=True).start()

    def run(self) -> int:
        work = self.home / f"attempt-{self.attempt}"
        work.mkdir(parents=True, exist_ok=True)
        self.write_status("starting")
        events = work / "events.jsonl"
        tail = FileTail(events, ChunkStream(self.bucket, f"{self.prefix}/{EVENTS_DIR}", "jsonl"))
        ckpt: CheckpointSync | None = None
        flusher = threading.Thread(target=self._flusher, args=(tail, None), daemon=True)
        flusher.start()
        rc: int | None = None
        try:
            self.log(f"attempt {self.attempt} on {self.md.get('instance/name')}")
            self._install_bundle(work)
            ref = work / STEP_RUN_REF
            if not self._download(STEP_RUN_REF, ref):
                raise RuntimeError(f"no {STEP_RUN_REF} in the launch bundle")
            env = {**os.environ, **{k: str(v) for k, v in (self.instr.get("env") or {}).items()}}
            exp = work / EXPERIMENT_FILE
            if self._download(EXPERIMENT_FILE, exp):
                env[EXPERIMENT_ENV] = str(exp)
            scratch = work / "scratch"
            scratch.mkdir(exist_ok=True)
            local_ckpt = work / CHECKPOINTS_DIR
            ckpt = CheckpointSync(
                self.bucket,
                f"{self.launch_prefix}/{CHECKPOINTS_DIR}",
                local_ckpt,
                self.instr.get("checkpoint_marker", "trainer_state.json"),
            )
            resumed = ckpt.download()
            if resumed:
                self.log(f"resuming: checkpoints {', '.join(resumed)} fetched from GCS")
            # The flusher uploads checkpoints from now on.
            self.stopping.set()
            flusher.join()
            self.stopping.clear()
            flusher = threading.Thread(target=self._flusher, args=(tail, ckpt), daemon=True)
            flusher.start()
            env.update(
                {
                    CHECKPOINT_DIR_ENV: str(local_ckpt),
                    PREEMPTIBLE_ENV: "1",
                    SCRATCH_ENV: str(scratch),
                    LAUNCH_INFO_ENV: json.dumps(self.instr.get("launch_info") or {}),
                    "PYTHONUNBUFFERED": "1",
                }
            )
            cwd: Path | None = work
            if self.instr.get("bundle_install") == "skip":
                cwd = None
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (os.getcwd(), env.get("PYTHONPATH")) if p
                )
            if self.preempted.is_set():
                raise _Preempted()
            self.write_status("running")
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "resources.remote.step_worker", str(ref), str(events)],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            if self.preempted.is_set():  # SIGTERM arrived while starting it
                self.proc.send_signal(signal.SIGTERM)
            for line in self.proc.stdout:
                self.logs.write_line(line.rstrip("\n"))
            rc = self.proc.wait()
            if self.preempted.is_set():
                raise _Preempted()
            self.log(f"step worker exited with code {rc}")
            self._final_flush(tail, ckpt)
            self.write_status("exited", returncode=rc)
            return 0
        except _Preempted:
            self.log("step stopped for the preemption")
            self._final_flush(tail, ckpt)
            self.write_status(
                "preempted", returncode=rc, why=self.stop_reason, confirmed=self._confirmed()
            )
            return 0
        except Exception as e:
            self.log(f"agent failed: {e}\n{traceback.format_exc()}")
            self._final_flush(tail, ckpt)
            self.write_status("failed", error=str(e), preempted=self.preempted.is_set())
            return 1
        finally:
            self.stopping.set()

    def _confirmed(self) -> bool:
        """Whether GCE says this was a preemption (a SIGTERM alone may be a plain delete)."""
        try:
            return (self.md.get("instance/preempted", timeout=3) or "").strip().upper() == "TRUE"
        except Exception:
            return False

    def _final_flush(self, tail: FileTail, ckpt: CheckpointSync | None) -> None:
        self.stopping.set()
        for fn in (tail.flush, lambda: ckpt and ckpt.upload(), self.logs.flush):
            try:
                fn()
            except Exception as e:
                print(f"[agent] final flush failed: {e}", file=sys.stderr)


class _Preempted(Exception):
    pass


# -- image build and disk export ----------------------------------------------------------

HEALTH_CHECK = r"""
import json, sys, time
args = json.loads(sys.argv[1])
t0 = time.time()
out = {"ok": False}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = bool(torch.cuda.is_available())
    if out["cuda"]:
        out["device"] = torch.cuda.get_device_name(0)
        x = torch.ones(256, 256, device="cuda")
        out["cuda_matmul"] = float((x @ x).sum().item())
    if args.get("model"):
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(args["model"], revision=args.get("revision"))
        out["model_params"] = sum(p.numel() for p in m.parameters())
    import importlib
    for name in args.get("import_modules") or ():  # the bundle's packages import
        importlib.import_module(name)
    out["ok"] = out["cuda"] or not args.get("require_cuda", True)
    if not out["ok"]:
        out["error"] = "CUDA is not available"
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
out["seconds"] = round(time.time() - t0, 2)
print(json.dumps(out))
"""


def run_image_build(instr: dict[str, Any], home: Path) -> int:
    client = make_storage_client()
    bucket_name, report = parse_gs_uri(instr["report_uri"])
    bucket = client.bucket(bucket_name)
    report_body: dict[str, Any] = {"ok": False}
    try:
        if instr.get("bundle_install", "pip") != "skip":
            b_bucket, b_prefix = parse_gs_uri(instr["bundle_uri"])
            wheels = [
                b
                for b in client.list_blobs(b_bucket, prefix=b_prefix + "/")
                if b.name.endswith(".whl")
            ]
            local = home / wheels[0].name.rsplit("/", 1)[-1]
            home.mkdir(parents=True, exist_ok=True)
            wheels[0].download_to_filename(str(local))
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(local)], check=True)
        args = {
            "require_cuda": instr.get("require_cuda", True),
            "model": instr.get("health_model"),
            "revision": instr.get("health_model_revision"),
            "import_modules": instr.get("import_modules") or [],
        }
        env = dict(os.environ)
        if instr.get("bundle_install") == "skip":
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (os.getcwd(), env.get("PYTHONPATH")) if p
            )
        res = subprocess.run(
            [sys.executable, "-c", HEALTH_CHECK, json.dumps(args)],
            capture_output=True,
            text=True,
            env=env,
        )
        lines = res.stdout.strip().splitlines()
        report_body = json.loads(lines[-1]) if lines else {"ok": False}
        if res.returncode != 0 or not lines:
            report_body.setdefault("error", res.stderr[-2000:])
    except Exception as e:
        report_body = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    bucket.blob(report).upload_from_string(json.dumps(report_body), "application/json")
    print(f"[agent] health report: {report_body}")
    return 0 if report_body.get("ok") else 1


def run_export_disk(instr: dict[str, Any]) -> int:
    """Stream the attached disk into GCS as a tar.gz holding ``disk.raw``."""
    client = make_storage_client()
    device = Path(os.environ.get(DEVICE_ROOT_ENV, "/dev/disk/by-id")) / (
        "google-" + instr["device_name"]
    )
    bucket_name, name = parse_gs_uri(instr["archive_uri"])
    bucket = client.bucket(bucket_name)
    report = {"ok": False}
    try:
        with open(device, "rb") as src:
            size = os.lseek(src.fileno(), 0, os.SEEK_END)
            os.lseek(src.fileno(), 0, os.SEEK_SET)
            with bucket.blob(name).open("wb", content_type="application/x-tar") as out:
                # GNU format: the rawDisk import expects the tar `--format=oldgnu` writes.
                with tarfile.open(fileobj=out, mode="w|gz", format=tarfile.GNU_FORMAT) as tar:
                    info = tarfile.TarInfo("disk.raw")
                    info.size = size
                    tar.addfile(info, src)
        report = {"ok": True, "bytes": size, "archive_uri": instr["archive_uri"]}
    except Exception as e:
        report = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    _, report_name = parse_gs_uri(instr["report_uri"])
    bucket.blob(report_name).upload_from_string(json.dumps(report), "application/json")
    print(f"[agent] export report: {report}")
    return 0 if report["ok"] else 1


def main() -> int:
    md = Metadata()
    raw = md.attribute(INSTRUCTIONS_KEY)
    if not raw:
        print(f"[agent] no '{INSTRUCTIONS_KEY}' metadata attribute: nothing to do", file=sys.stderr)
        return 2
    instr = json.loads(raw)
    home = Path(os.environ.get(HOME_ENV) or "/opt/lab/run")
    home.mkdir(parents=True, exist_ok=True)
    mode = instr.get("mode", "step")
    if mode == "image-build":
        return run_image_build(instr, home)
    if mode == "export-disk":
        return run_export_disk(instr)
    if mode != "step":
        print(f"[agent] unknown mode {mode!r}", file=sys.stderr)
        return 2
    agent = StepAgent(instr, md, home)
    signal.signal(signal.SIGTERM, lambda *_: agent.on_preempted("SIGTERM"))
    threading.Thread(target=agent._watch_preemption, daemon=True).start()
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
