"""The local disposable-worker step launcher.

Each launched step runs in a fresh Python subprocess with its own scratch
directory (``$LAB_SCRATCH_DIR``), which is deleted afterwards whatever happened:
success, failure, a crash of the worker, or the run being terminated. The step's
Dagster events are relayed into the run as they are written, and the worker's
stdout/stderr lines are relayed as debug log lines, so the UI shows progress live.
The GCE launcher does the same on a VM; asset code does not change between them.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dagster._config.pythonic_config import ConfigurableResourceFactory
from dagster._core.definitions.step_launcher import StepLauncher
from dagster._core.errors import raise_execution_interrupts
from dagster._core.events import DagsterEvent
from dagster._core.execution.context.system import StepExecutionContext
from dagster._core.execution.plan.external_step import step_context_to_step_run_ref

from resources.compute.events import LocalEventTail, is_terminal
from resources.remote.protocol import SCRATCH_ENV, SCRATCH_ROOT_ENV


class StepWorkerError(RuntimeError):
    """The worker process died without reporting the step's end."""


class LocalProcessStepLauncher(StepLauncher):
    def __init__(
        self,
        scratch_root: str | None = None,
        keep_scratch: bool = False,
        poll_interval_s: float = 0.1,
        python: str | None = None,
    ):
        self.scratch_root = scratch_root
        self.keep_scratch = keep_scratch
        self.poll_interval_s = poll_interval_s
        self.python = python or sys.executable

    def launch_step(self, step_context: StepExecutionContext) -> Iterator[DagsterEvent]:
        step_run_ref = step_context_to_step_run_ref(step_context)
        root = Path(self.scratch_root or os.environ.get(SCRATCH_ROOT_ENV) or tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        run_id = step_context.dagster_run.run_id
        scratch = Path(tempfile.mkdtemp(prefix=f"lab-{run_id[:8]}-", dir=root))
        proc: subprocess.Popen[str] | None = None
        step_context.log.info(f"launching {step_run_ref.step_key} in a local worker ({scratch})")
        try:
            ref_path = scratch / "step_run_ref.pkl"
            with open(ref_path, "wb") as f:
                pickle.dump(step_run_ref, f)
            events_path = scratch / "events.jsonl"
            work = scratch / "work"
            work.mkdir()
            env = {**os.environ, SCRATCH_ENV: str(work), "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "resources.remote.step_worker",
                    str(ref_path),
                    str(events_path),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
                env=env,
                preexec_fn=_die_with_parent,
            )
            lines: queue.Queue[str] = queue.Queue()
            reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
            reader.start()
            recent: collections.deque[str] = collections.deque(maxlen=40)
            tail = LocalEventTail(events_path)
            ended = False
            with raise_execution_interrupts():
                while True:
                    exited = proc.poll() is not None
                    for entry in tail.poll():
                        step_context.instance.handle_new_event(entry)
                        ended = ended or is_terminal(entry)
                        if entry.is_dagster_event:
                            yield entry.get_dagster_event()
                    _relay_lines(step_context, lines, recent)
                    if exited:
                        break
                    time.sleep(self.poll_interval_s)
                reader.join(timeout=5)
                _relay_lines(step_context, lines, recent)
            if not ended:
                raise StepWorkerError(
                    f"step worker for {step_run_ref.step_key} exited with code {proc.returncode} "
                    "before the step ended; its last output:\n" + "\n".join(recent)
                )
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if not self.keep_scratch:
                shutil.rmtree(scratch, ignore_errors=True)


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM it if the plan process dies (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _pump(stream, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    stream.close()


def _relay_lines(
    step_context: StepExecutionContext, lines: queue.Queue[str], recent: collections.deque[str]
) -> None:
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            return
        recent.append(line)
        step_context.log.debug(f"[worker] {line}")


class LocalStepLauncher(ConfigurableResourceFactory[StepLauncher]):
    """Runs each step that requires it in a fresh local subprocess (a disposable worker)."""

    scratch_root: str | None = None
    keep_scratch: bool = False

    def create_resource(self, context) -> StepLauncher:
        return LocalProcessStepLauncher(
            scratch_root=self.scratch_root, keep_scratch=self.keep_scratch
        )
