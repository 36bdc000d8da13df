"""The local disposable-worker step launcher.

Each launched step runs in its own worker process with its own scratch directory
(``$LAB_SCRATCH_DIR``), which is deleted afterwards whatever happened: success,
failure, a crash of the worker, or the run being terminated. The step's Dagster
events are relayed into the run as they are written, and the worker's stdout/stderr
lines are relayed as debug log lines, so the UI shows progress live. The GCE
launcher does the same on a VM; asset code does not change between them.

On Linux the worker is, by default, forked by the warm worker server
(``warm_server``), which keeps dagster/torch/transformers/peft/trl/datasets imported,
so a step starts in a fraction of a second instead of paying seconds of imports;
the run process itself imports none of them. With ``warm_workers=False`` (or
``LAB_WARM_WORKERS=0``), or when the server cannot be reached or started, the worker
is a cold ``python -m resources.remote.step_worker`` subprocess, as the log says.
Torch's CPU threads per worker are ``torch_threads`` (``$LAB_TORCH_THREADS``), by
default the cores divided by ``concurrent_workers`` (``$LAB_CONCURRENT_WORKERS``).
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
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
from resources.compute.local import scratch as scratch_dirs
from resources.compute.local import warm_server
from resources.compute.local.workers import ColdWorker, WarmWorker
from resources.remote.protocol import (
    CONCURRENT_WORKERS_ENV,
    SCRATCH_ENV,
    TORCH_THREADS_ENV,
    WARM_WORKERS_ENV,
)


class StepWorkerError(RuntimeError):
    """The worker process died without reporting the step's end."""


class LocalProcessStepLauncher(StepLauncher):
    def __init__(
        self,
        scratch_root: str | None = None,
        keep_scratch: bool = False,
        poll_interval_s: float = 0.1,
        python: str | None = None,
        warm_workers: bool | None = None,
        torch_threads: int = 0,
        concurrent_workers: int = 0,
        warm_idle_timeout_s: float | None = None,
        warm_preload: list[str] | None = None,
    ):
        self.scratch_root = scratch_root
        self.keep_scratch = keep_scratch
        self.poll_interval_s = poll_interval_s
        self.python = python or sys.executable
        self.warm_workers = warm_workers
        self.torch_threads = torch_threads
        self.concurrent_workers = concurrent_workers
        self.warm_idle_timeout_s = warm_idle_timeout_s
        self.warm_preload = warm_preload

    def launch_step(self, step_context: StepExecutionContext) -> Iterator[DagsterEvent]:
        step_run_ref = step_context_to_step_run_ref(step_context)
        root = Path(self.scratch_root) if self.scratch_root else scratch_dirs.default_root()
        root.mkdir(parents=True, exist_ok=True)
        run_id = step_context.dagster_run.run_id
        scratch = Path(tempfile.mkdtemp(prefix=f"{scratch_dirs.PREFIX}{run_id[:8]}-", dir=root))
        scratch_dirs.claim(scratch)  # so the next `lab` can remove it if this process dies
        worker: ColdWorker | WarmWorker | None = None
        step_context.log.info(f"launching {step_run_ref.step_key} in a local worker ({scratch})")
        try:
            ref_path = scratch / "step_run_ref.pkl"
            with open(ref_path, "wb") as f:
                pickle.dump(step_run_ref, f)
            events_path = scratch / "events.jsonl"
            work = scratch / "work"
            work.mkdir()
            env = {
                **os.environ,
                SCRATCH_ENV: str(work),
                "PYTHONUNBUFFERED": "1",
                TORCH_THREADS_ENV: str(self.torch_thread_count()),
            }
            argv = [str(ref_path), str(events_path)]
            label = f"run {run_id[:8]} step {step_run_ref.step_key}"
            worker = self._start_worker(step_context, argv, env, scratch, label)
            step_context.log.info(f"{step_run_ref.step_key} runs in {worker.description}")
            yield from self._relay(step_context, worker, events_path, step_run_ref.step_key)
        finally:
            if worker is not None:
                worker.stop()
            if not self.keep_scratch:
                shutil.rmtree(scratch, ignore_errors=True)
            if worker is not None:
                worker.close()

    def _relay(
        self,
        step_context: StepExecutionContext,
        worker: ColdWorker | WarmWorker,
        events_path: Path,
        step_key: str,
    ) -> Iterator[DagsterEvent]:
        """Relay events and output lines until the worker exits; raise if the step never ended."""
        recent: collections.deque[str] = collections.deque(maxlen=40)
        tail = LocalEventTail(events_path)
        ended = False
        with raise_execution_interrupts():
            while True:
                worker.poll()
                exited = worker.exited
                for entry in tail.poll():
                    step_context.instance.handle_new_event(entry)
                    ended = ended or is_terminal(entry)
                    if entry.is_dagster_event:
                        yield entry.get_dagster_event()
                _relay_lines(worker, recent)
                if exited:
                    break
                time.sleep(self.poll_interval_s)
            worker.join_output()
            _relay_lines(worker, recent)
        if not ended:
            raise StepWorkerError(
                f"step worker for {step_key} {describe_exit(worker.poll())} "
                "before the step ended; its last output:\n" + "\n".join(recent)
            )

    def _start_worker(
        self,
        step_context: StepExecutionContext,
        argv: list[str],
        env: dict[str, str],
        scratch: Path,
        label: str,
    ) -> ColdWorker | WarmWorker:
        """A warm worker if enabled and the server answers, else a cold subprocess."""
        if not self.warm_enabled():
            return ColdWorker(self.python, argv, env)
        request = {
            "argv": argv,
            "cwd": os.getcwd(),
            "env": env,
            "scratch": str(scratch),
            "keep_scratch": self.keep_scratch,
            "label": label,
        }
        error: Exception | None = None
        for _ in range(2):  # a server that died mid-request is replaced once
            try:
                return WarmWorker(self.python, self.preload(), self.idle_timeout_s(), request)
            except (warm_server.WarmServerUnavailable, OSError, ValueError) as e:
                error = e
        step_context.log.warning(
            f"warm worker server unavailable ({error}); starting a cold subprocess worker"
        )
        return ColdWorker(self.python, argv, env)

    def warm_enabled(self) -> bool:
        if not sys.platform.startswith("linux"):
            return False
        if self.warm_workers is not None:
            return self.warm_workers
        return os.environ.get(WARM_WORKERS_ENV, "1").strip().lower() not in ("0", "false", "no")

    def torch_thread_count(self) -> int:
        explicit = self.torch_threads or int(os.environ.get(TORCH_THREADS_ENV) or 0)
        if explicit > 0:
            return explicit
        workers = self.concurrent_workers or int(os.environ.get(CONCURRENT_WORKERS_ENV) or 1)
        return max(1, len(os.sched_getaffinity(0)) // max(1, workers))

    def preload(self) -> tuple[str, ...]:
        if self.warm_preload is not None:
            return tuple(self.warm_preload)
        return warm_server.configured_preload()

    def idle_timeout_s(self) -> float:
        if self.warm_idle_timeout_s is not None:
            return self.warm_idle_timeout_s
        return warm_server.configured_idle_timeout_s()


def describe_exit(code: int | None) -> str:
    """How a worker ended, in words: a negative code is the signal that killed it."""
    if code is None:
        return "exited with code unknown (its warm server went away)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if code == -9 else ""
        return f"was ended by {name} (signal {-code}){hint}"
    return f"exited with code {code}"


def _relay_lines(
    worker: ColdWorker | WarmWorker,
    recent: collections.deque[str],
) -> None:
    while True:
        try:
            line = worker.lines.get_nowait()
        except queue.Empty:
            return
        recent.append(line)
        # to this process's stderr, which Dagster captures as the step's log: the worker's
        # events already reach the event log, and its console echo of them would double it
        print(f"[worker] {line}", file=sys.stderr, flush=True)


class LocalStepLauncher(ConfigurableResourceFactory[StepLauncher]):
    """Runs each step that requires it in its own local worker process (a disposable
    worker, forked by the warm worker server unless ``warm_workers`` is False)."""

    scratch_root: str | None = None
    keep_scratch: bool = False
    warm_workers: bool | None = None  # None: $LAB_WARM_WORKERS, default on (Linux)
    torch_threads: int = 0  # 0: $LAB_TORCH_THREADS, else cores // concurrent_workers
    concurrent_workers: int = 0  # 0: $LAB_CONCURRENT_WORKERS, else 1
    warm_idle_timeout_s: float | None = None  # None: $LAB_WARM_IDLE_TIMEOUT_S, else 600
    warm_preload: list[str] | None = None  # None: $LAB_WARM_PRELOAD, else the default list

    def create_resource(self, context) -> StepLauncher:
        return LocalProcessStepLauncher(
            scratch_root=self.scratch_root,
            keep_scratch=self.keep_scratch,
            warm_workers=self.warm_workers,
            torch_threads=self.torch_threads,
            concurrent_workers=self.concurrent_workers,
            warm_idle_timeout_s=self.warm_idle_timeout_s,
            warm_preload=self.warm_preload,
        )
