"""The VM agent's ``step`` mode: run one Dagster step on the VM, streamed to GCS.

Split out of ``agent`` (it ships to the VM beside it and imports only the standard
library and the other agent modules). It downloads the launch bundle, installs the
wheel with pip (``bundle_install: pip``; ``skip`` runs the step with the agent's
own interpreter and environment, as the fake Compute Engine does), fetches the
step's checkpoints and runs ``python -m resources.remote.step_worker`` in the
attempt's work directory. While it runs, the Dagster events file and the worker's
output go up as chunk streams, complete checkpoints are mirrored, and
``status.json`` is rewritten as a heartbeat. On preemption (metadata
``instance/preempted`` turns TRUE, or SIGTERM) the worker gets SIGTERM and
``grace_s`` to checkpoint and exit; its checkpoints are uploaded and the status
says ``preempted``.

With a ``warm`` block in its instructions the agent does not stop after the step: it
keeps the VM's life record (``agent_warm``), takes the next step a launcher hands the
idle VM (each step in a work directory of its own; the bundle installed once), and
in the end retires the VM, deleting the instance itself (``agent_compute``). A step
therefore runs to its end and commits its outputs whether or not the orchestrator
that launched it is still there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from resources.remote.agent_compute import delete_self
from resources.remote.agent_metadata import Metadata
from resources.remote.agent_sync import (
    CheckpointSync,
    ChunkStream,
    FileTail,
    LineBuffer,
    retry,
)
from resources.remote.agent_warm import WarmPost
from resources.remote.protocol import (
    BUNDLE_DIR,
    CHECKPOINT_DIR_ENV,
    CHECKPOINTS_DIR,
    EVENTS_DIR,
    EXPERIMENT_ENV,
    EXPERIMENT_FILE,
    LAUNCH_INFO_ENV,
    LOGS_DIR,
    PREEMPTIBLE_ENV,
    SCRATCH_ENV,
    STATUS_FILE,
    STEP_RUN_REF,
    VM_WORKING,
    attempt_prefix,
    make_storage_client,
    parse_gs_uri,
)


class StepAgent:
    """Runs the step its instructions name, then (with a ``warm`` block) the next ones the
    VM is handed (``agent_warm``), then retires the VM."""

    def __init__(self, instr: dict[str, Any], md: Metadata, home: Path):
        self.md = md
        self.home = home
        self.client = make_storage_client()
        self.preempted = threading.Event()  # the VM is going: preempted or being deleted
        self.done = threading.Event()  # the agent is finishing: no more steps
        self.stop_reason = ""
        self._status_lock = threading.Lock()
        self.warm: WarmPost | None = None
        self.installed: str | None = None  # the wheel installed on this VM, by name
        self.steps_run = 0
        self._begin(instr)

    def _begin(self, instr: dict[str, Any]) -> None:
        """Take up one step's instructions (the first from metadata, the next from a claim)."""
        self.instr = instr
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
        self.stopping = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.state = "starting"

    def log(self, msg: str) -> None:
        self.logs.write_line(f"[agent] {msg}")

    def write_status(self, state: str, **extra: Any) -> None:
        with self._status_lock:
            self.state = state
            body = {"state": state, "attempt": self.attempt, "t": time.time(), **extra}
            name = f"{self.prefix}/{STATUS_FILE}"
            retry(
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
        wheel_name = wheels[0].name.rsplit("/", 1)[-1]
        if self.installed == wheel_name:
            self.log(f"{wheel_name} is installed already (a warm VM of the same bundle)")
            return
        local = work / BUNDLE_DIR / wheel_name
        local.parent.mkdir(parents=True, exist_ok=True)
        wheels[0].download_to_filename(str(local))
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        # Dependencies first (a pre-baked image has them: quick), then the lab's own
        # code replaced even though its version number has not changed.
        for extra in ([], ["--no-deps", "--force-reinstall"]):
            self.log(f"pip install {' '.join(extra)} {local.name}")
            self._run_logged([*pip, *extra, str(local)], cwd=work)
        self.installed = wheel_name

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
                if ckpt is not None and (name := ckpt.serve_request()):
                    self.log(f"checkpoint {name} durable in GCS (the step waited for it)")
                if ckpt is not None and now - last_ckpt >= ckpt_every:
                    for name in ckpt.upload():
                        self.log(f"checkpoint {name} uploaded")
                    last_ckpt = now
                # A heartbeat while installing too (pip on a bare image takes minutes).
                if now - last_beat >= self.heartbeat_s and self.state in ("starting", "running"):
                    self.write_status(self.state)
                    self._beat_working()
                    last_beat = now
            except Exception as e:  # keep streaming; the final flush reports for good
                print(f"[agent] flush failed: {e}", file=sys.stderr)

    def _watch_preemption(self) -> None:
        while not self.done.is_set() and not self.preempted.is_set():
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
        """Run the first step; with a ``warm`` block, the next ones; then retire the VM."""
        warm = self.instr.get("warm")
        if warm:
            vm = (self.md.get("instance/name") or "").strip()
            self.warm = WarmPost(self.client, warm, vm, _console)
            self._beat_working()
        rc = self._run_step()
        why = "its step ended"
        while self.warm is not None and rc == 0 and not self.preempted.is_set():
            nxt, why = self.warm.next_step(self.preempted)
            if nxt is None:
                break
            self._begin(nxt)
            rc = self._run_step()
        self.done.set()
        if self.warm is not None:
            if self.preempted.is_set():
                self.warm.settle()  # going anyway (preempted, or deleted by someone else)
            else:
                if rc != 0:
                    why = "the agent failed: the VM is not trusted with another step"
                endpoint = warm.get("compute_endpoint")
                self.warm.retire(why, lambda: delete_self(self.md, endpoint))
        return rc

    def _beat_working(self) -> None:
        if self.warm is not None:
            self.warm.beat(VM_WORKING, launch=self.launch_prefix, attempt=self.attempt)

    def _run_step(self) -> int:
        previous = self.home / f"step-{self.steps_run}"
        self.steps_run += 1
        if self.steps_run > 1:
            shutil.rmtree(previous, ignore_errors=True)  # the last step's scratch and checkpoints
        work = self.home / f"step-{self.steps_run}" / f"attempt-{self.attempt}"
        work.mkdir(parents=True, exist_ok=True)
        self.write_status("starting")
        events = work / "events.jsonl"
        tail = FileTail(events, ChunkStream(self.bucket, f"{self.prefix}/{EVENTS_DIR}", "jsonl"))
        ckpt: CheckpointSync | None = None
        flusher = self._start_flusher(tail, None)
        rc: int | None = None
        try:
            self.log(f"attempt {self.attempt} on {self.md.get('instance/name')}")
            self._install_bundle(work)
            ref = work / STEP_RUN_REF
            if not self._download(STEP_RUN_REF, ref):
                raise RuntimeError(f"no {STEP_RUN_REF} in the launch bundle")
            env = self._step_env(work)
            ckpt = self._fetch_checkpoints(work)
            # The flusher uploads checkpoints from now on.
            self.stopping.set()
            flusher.join()
            self.stopping.clear()
            self._start_flusher(tail, ckpt)
            rc = self._run_worker(work, ref, events, env)
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

    def _start_flusher(self, tail: FileTail, ckpt: CheckpointSync | None) -> threading.Thread:
        flusher = threading.Thread(target=self._flusher, args=(tail, ckpt), daemon=True)
        flusher.start()
        return flusher

    def _step_env(self, work: Path) -> dict[str, str]:
        """The step worker's environment: the agent's, the launch's `env`, the lab's names."""
        env = {**os.environ, **{k: str(v) for k, v in (self.instr.get("env") or {}).items()}}
        exp = work / EXPERIMENT_FILE
        if self._download(EXPERIMENT_FILE, exp):
            env[EXPERIMENT_ENV] = str(exp)
        scratch = work / "scratch"
        scratch.mkdir(exist_ok=True)
        env.update(
            {
                CHECKPOINT_DIR_ENV: str(work / CHECKPOINTS_DIR),
                PREEMPTIBLE_ENV: "1",
                SCRATCH_ENV: str(scratch),
                LAUNCH_INFO_ENV: json.dumps(self.instr.get("launch_info") or {}),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.instr.get("bundle_install") == "skip":
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (os.getcwd(), env.get("PYTHONPATH")) if p
            )
        return env

    def _fetch_checkpoints(self, work: Path) -> CheckpointSync:
        """The step's checkpoints from GCS (a resumed attempt), synced back while it runs."""
        ckpt = CheckpointSync(
            self.bucket,
            f"{self.launch_prefix}/{CHECKPOINTS_DIR}",
            work / CHECKPOINTS_DIR,
            self.instr.get("checkpoint_marker", "trainer_state.json"),
        )
        resumed = ckpt.download()
        if resumed:
            self.log(f"resuming: checkpoints {', '.join(resumed)} fetched from GCS")
        return ckpt

    def _run_worker(self, work: Path, ref: Path, events: Path, env: dict[str, str]) -> int:
        """Run the step worker to its end, its output into the logs; returns its exit code."""
        # skip: the agent's own environment (its working directory is on PYTHONPATH)
        cwd = None if self.instr.get("bundle_install") == "skip" else work
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
        return self.proc.wait()

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


def _console(msg: str) -> None:
    """A line for the serial console only (between steps there is no launch to log to)."""
    try:
        print(f"[agent] {msg}", flush=True)
    except (OSError, ValueError):
        pass
