"""The lab's Dagster run launcher: each run's worker forked from a pre-imported process.

Dagster's default launcher starts every run as a fresh interpreter that imports
dagster and the code location before the run's first step: about 4 s per run on a
2-core machine, paid once per partition. The lab runs one partition per run (so each
partition keeps its own data version, metadata, checks and failure), so that cost
would dominate. This launcher, named in the instance's ``dagster.yaml``, has the warm
worker server (``resources.compute.local.warm_server``: dagster, torch & co already
imported) fork the run worker (``run_worker.py``) instead. The run is still one
isolated process that rebuilds its job from the run's code origin and reports to
the instance exactly as Dagster's own worker does; only its start is cheaper.

- **Launch**: the worker is detached from the daemon that launched it; its
  stdout/stderr go to ``$DAGSTER_HOME/lab/runs/<run id>.log``; the run gets the tag
  ``lab/run_worker`` (host, pid, start time) so it can be found again. Where no warm
  server can be had (not Linux, or it fails to start) the worker is a cold
  ``python -m lab_assets.orchestration.run_worker`` subprocess, started the same way.
- **Terminate**: SIGTERM to the worker, which Dagster's run worker turns into a
  cancellation (the run ends CANCELED, its steps' workers and VMs are cleaned up by
  their launchers).
- **Health**: the run-monitoring daemon asks whether the worker still lives, so a run
  whose worker was killed is marked failed instead of staying STARTED forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from dagster._core.launcher.base import (
    CheckRunHealthResult,
    LaunchRunContext,
    RunLauncher,
    WorkerStatus,
)
from dagster._core.storage.dagster_run import DagsterRun
from dagster._serdes import ConfigurableClass, ConfigurableClassData, serialize_value

from lab_assets.names import RUN_WORKER_TAG
from resources import procs

RUN_WORKER_MODULE = "lab_assets.orchestration.run_worker"


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    """Launches each run's worker from the warm worker server (cold subprocess fallback)."""

    def __init__(
        self,
        inst_data: ConfigurableClassData | None = None,
        warm: bool = True,
        idle_timeout_s: float | None = None,  # None: $LAB_WARM_IDLE_TIMEOUT_S, else 600
    ):
        self._inst_data = inst_data
        self.warm = warm
        self.idle_timeout_s = idle_timeout_s
        self._cold: dict[int, subprocess.Popen] = {}  # reaped as we go: no zombies
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        from dagster import Field, Noneable

        return {
            "warm": Field(bool, is_required=False, default_value=True),
            "idle_timeout_s": Field(Noneable(float), is_required=False, default_value=None),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: dict[str, Any]
    ) -> WarmRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    def launch_run(self, context: LaunchRunContext) -> None:
        from dagster._grpc.types import ExecuteRunArgs

        self._reap()
        run = context.dagster_run
        args = serialize_value(
            ExecuteRunArgs(
                job_origin=run.job_code_origin,
                run_id=run.run_id,
                instance_ref=self._instance.get_ref(),
                set_exit_code_on_failure=True,
            )
        )
        log_path = self._log_path(run.run_id)
        with open(log_path, "ab") as log:
            pid, how = self._start(run, args, log.fileno())
        worker = procs.identity(pid)
        self._instance.add_run_tags(run.run_id, {RUN_WORKER_TAG: json.dumps(worker)})
        self._instance.report_engine_event(
            f"Run worker started ({how}, pid {pid}); its output: {log_path}", run
        )

    def warm_up(self) -> threading.Thread | None:
        """Start the warm worker server in the background (a first run need not wait for
        its imports); None where no warm server is used."""
        if not self._warm_enabled():
            return None
        from resources.compute.local import warm_server

        def start() -> None:
            with contextlib.suppress(warm_server.WarmServerUnavailable, OSError):
                warm_server.ensure_server(
                    sys.executable, warm_server.configured_preload(), self._idle_timeout_s()
                )

        thread = threading.Thread(target=start, name="lab-warm-up", daemon=True)
        thread.start()
        return thread

    def _idle_timeout_s(self) -> float:
        from resources.compute.local import warm_server

        if self.idle_timeout_s is not None:
            return self.idle_timeout_s
        return warm_server.configured_idle_timeout_s()

    def _warm_enabled(self) -> bool:
        return self.warm and sys.platform.startswith("linux")

    def _start(self, run: DagsterRun, args: str, out_fd: int) -> tuple[int, str]:
        if self._warm_enabled():
            from resources.compute.local import warm_server

            request = {
                "module": RUN_WORKER_MODULE,
                "argv": [args],
                "cwd": os.getcwd(),
                "env": dict(os.environ),
                "label": f"run {run.run_id}",
            }
            try:
                pid, _ = warm_server.start_detached(
                    sys.executable,
                    warm_server.configured_preload(),
                    self._idle_timeout_s(),
                    request,
                    out_fd,
                )
                return pid, "forked by the warm worker server"
            except (warm_server.WarmServerUnavailable, OSError, ValueError) as e:
                self._instance.report_engine_event(
                    f"warm worker server unavailable ({e}); starting a cold run worker", run
                )
        proc = subprocess.Popen(
            [sys.executable, "-m", RUN_WORKER_MODULE, args],
            stdin=subprocess.DEVNULL,
            stdout=out_fd,
            stderr=out_fd,
            start_new_session=True,
        )
        self._cold[proc.pid] = proc
        return proc.pid, "cold subprocess"

    def _log_path(self, run_id: str) -> Path:
        root = getattr(self._instance, "root_directory", None) or os.environ.get("DAGSTER_HOME")
        directory = Path(root or ".") / "lab" / "runs"
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{run_id}.log"

    def _reap(self) -> None:
        for pid, proc in list(self._cold.items()):
            if proc.poll() is not None:
                del self._cold[pid]

    def _worker(self, run: DagsterRun) -> dict | None:
        raw = run.tags.get(RUN_WORKER_TAG)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def _alive(self, worker: dict) -> bool:
        self._reap()
        pid = int(worker["pid"])
        if not os.path.isdir("/proc/self"):  # no procfs (macOS): no start time to compare
            return procs.alive(pid)
        return procs.start_time(pid) == worker.get("start") and procs.alive(pid)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False  # (lab and the daemon may both ask: the second finds it canceled)
        worker = self._worker(run)
        if worker is None:
            # Never launched (a queued run another canceller got to first, or a launch that
            # failed): nothing to signal, and nothing will report the cancellation.
            self._instance.report_run_canceled(run, "canceled before a run worker started")
            return True
        self._instance.report_run_canceling(run)
        if worker.get("host") != socket.gethostname() or not self._alive(worker):
            self._instance.report_engine_event(
                "No live run worker to send the termination request to.", run, cls=self.__class__
            )
            return False
        os.kill(int(worker["pid"]), signal.SIGTERM)  # Dagster's worker: SIGTERM = cancel
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        worker = self._worker(run)
        if worker is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no lab run worker recorded")
        if worker.get("host") != socket.gethostname():
            return CheckRunHealthResult(
                WorkerStatus.RUNNING, f"run worker on {worker.get('host')}: not checked here"
            )
        if self._alive(worker):
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(worker["pid"]))
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"the run worker (pid {worker['pid']}) is gone; see {self._log_path(run.run_id)}",
            run_worker_id=str(worker["pid"]),
        )
