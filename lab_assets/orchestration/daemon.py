"""The daemon that serves an instance: find a live one, or start one for the duration.

Dagster's daemon launches queued runs and drives backfills. `dagster dev` runs one;
when none serves the instance (no recent heartbeat of the run-queue and backfill
daemons), `lab` starts its own for the experiment at hand and stops it when done.
The daemon loads the code location `-m lab_assets.definitions` with the experiment
named in `$LAB_EXPERIMENT` and the storage root in `$LAB_STORAGE_ROOT`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster import DagsterInstance
from dagster._daemon.controller import get_daemon_statuses
from dagster._daemon.daemon import BackfillDaemon
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

from lab_assets.experiment.load import EXPERIMENT_ENV, STORAGE_ENV
from lab_assets.experiment.resolved import Experiment

DEFINITIONS_MODULE = "lab_assets.definitions"
_NEEDED = (QueuedRunCoordinatorDaemon.daemon_type(), BackfillDaemon.daemon_type())
_FRESH_S = 75  # a heartbeat younger than this counts as live (daemons beat every 30 s)


class DaemonError(RuntimeError):
    """The daemon could not be started; the message quotes the end of its log."""


def daemon_serves(instance: DagsterInstance) -> bool:
    """True if a daemon with a recent heartbeat runs the queue and backfills of `instance`."""
    statuses = get_daemon_statuses(
        instance, _NEEDED, ignore_errors=True, heartbeat_tolerance_seconds=_FRESH_S
    )
    return all(s.healthy for s in statuses.values())


@contextmanager
def daemon_for(
    instance: DagsterInstance, exp: Experiment, log_path: Path, timeout_s: float = 120
) -> Iterator[bool]:
    """A daemon serving `instance` for the block; yields True if this call started it."""
    if daemon_serves(instance):
        yield False
        return
    env = {
        **os.environ,
        EXPERIMENT_ENV: str(exp.path),
        STORAGE_ENV: exp.storage_root,
        "DAGSTER_HOME": str(Path(instance.root_directory).resolve()),
        "LAB_DAEMON_PARENT_PID": str(os.getpid()),
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lab_assets.orchestration.daemon_main",
                "-m",
                DEFINITIONS_MODULE,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal is ours to handle, not its
        )
    try:
        _wait_until_serving(instance, proc, log_path, timeout_s)
        yield True
    finally:
        stop_daemon(proc)
        # Its last heartbeat would pass for a live daemon for a while: the next `lab`
        # must start its own instead of waiting on a daemon that is gone.
        instance.wipe_daemon_heartbeats()


def _wait_until_serving(
    instance: DagsterInstance, proc: subprocess.Popen, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not daemon_serves(instance):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "exited" if proc.poll() is not None else f"did not report in {timeout_s:.0f} s"
            stop_daemon(proc)
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise DaemonError(f"the Dagster daemon {why}; {log_path} ends:\n" + "\n".join(tail))
        time.sleep(0.5)


def stop_daemon(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the daemon's process group (daemon + code server), SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
