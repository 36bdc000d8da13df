"""What a `lab` that died left behind, settled when the next `lab` starts.

A `lab` process can end without running its `finally` (SIGKILL, a closed laptop, a
crash). Its daemon exits with it (`daemon_main` watches its parent), and then:

- a run whose worker died too stays STARTED, holding its pool's slot: Dagster's run
  monitoring would fail it, but only while a daemon runs. `settle` asks the run
  launcher about each run in progress and records the dead ones as failed (or
  canceled, if they were being canceled), which frees their slots;
- its backfill stays REQUESTED with nobody driving or following it, and the next
  sweep would count its partitions as "already being rebuilt" and launch nothing.
  A backfill carries its submitter in the tag `lab/owner`; one whose submitter is
  gone is canceled here (its queued runs with it), and its runs still alive, forked
  apart from `lab`, are waited for: they finish and commit, so their work is kept
  and not started a second time;
- scratch directories of dead run processes, and a local store's staging
  directories of a committer that died, are deleted.

Backfills from the UI carry no owner and are left to the daemon that serves them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG

from lab_assets.names import OWNER_TAG, RUN_WORKER_TAG
from resources import procs
from resources.compute.local import scratch as scratch_dirs
from resources.storage.base import ArtifactStore

_ALIVE = (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING)
_QUEUED = (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED)
_UNLAUNCHED_GRACE_S = 120.0  # a run STARTING this long with no worker recorded never got one


def owner_tags() -> dict[str, str]:
    """The tag naming this process as a backfill's submitter."""
    return {OWNER_TAG: json.dumps(procs.identity())}


def owner_gone(raw: str | None) -> bool:
    """True if the tag names a process on this host that no longer runs."""
    try:
        owner = json.loads(raw) if raw else None
    except ValueError:
        return False
    return isinstance(owner, dict) and procs.gone(owner)


@dataclass
class Settled:
    failed_runs: list[str] = field(default_factory=list)
    canceled_backfills: list[str] = field(default_factory=list)
    waited_runs: list[str] = field(default_factory=list)
    still_running: list[str] = field(default_factory=list)  # left when the wait was stopped
    removed_dirs: list[str] = field(default_factory=list)


def _label(run: DagsterRun) -> str:
    part = run.tags.get(PARTITION_NAME_TAG)
    assets = ",".join(k.to_user_string() for k in (run.asset_selection or ()))
    return f"run {run.run_id[:8]} ({assets}{f'[{part}]' if part else ''})"


def fail_dead_runs(instance: DagsterInstance) -> list[tuple[DagsterRun, str]]:
    """Record runs in progress whose worker is gone as failed (canceled if canceling)."""
    launcher = instance.run_launcher
    if not getattr(launcher, "supports_check_run_worker_health", False):
        return []
    ended = []
    for run in instance.get_runs(RunsFilter(statuses=list(_ALIVE))):
        if RUN_WORKER_TAG in run.tags:
            health = launcher.check_run_worker_health(run)
            if health.status not in (WorkerStatus.FAILED, WorkerStatus.NOT_FOUND):
                continue
            why = health.msg or "its worker is gone"
        elif run.status == DagsterRunStatus.STARTING and owner_gone(run.tags.get(OWNER_TAG)):
            record = instance.get_run_record_by_id(run.run_id)
            started = record.create_timestamp.timestamp() if record else time.time()
            if time.time() - started < _UNLAUNCHED_GRACE_S:
                continue
            why = "it never got a worker and the `lab` that launched it is gone"
        else:
            continue
        message = f"lab: {why} (found when `lab` started)"
        if run.status == DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, message=message)
        else:
            instance.report_run_failed(run, message=message)
        ended.append((run, message))
    return ended


def orphaned_backfills(instance: DagsterInstance) -> list:
    """Backfills still requested (or canceling) whose submitting `lab` is gone."""
    active = BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED, BulkActionStatus.CANCELING])
    return [b for b in instance.get_backfills(filters=active) if owner_gone(b.tags.get(OWNER_TAG))]


def settle(
    instance: DagsterInstance,
    store: ArtifactStore | None = None,
    on_event: Callable[[str], None] = print,
    stop: threading.Event | None = None,
    poll_s: float = 1.0,
) -> Settled:
    """Settle what dead `lab` processes left (see the module docstring)."""
    out = Settled()
    for run, message in fail_dead_runs(instance):
        out.failed_runs.append(run.run_id)
        on_event(f"{_label(run)} was left {run.status.value}: {message.removeprefix('lab: ')}")
    waiting: dict[str, DagsterRun] = {}
    for backfill in orphaned_backfills(instance):
        instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELED))
        out.canceled_backfills.append(backfill.backfill_id)
        runs = instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: backfill.backfill_id}))
        for run in runs:
            if run.status in _QUEUED:
                instance.run_coordinator.cancel_run(run.run_id)
            elif run.status in _ALIVE:
                waiting[run.run_id] = run
        on_event(
            f"backfill {backfill.backfill_id} ({backfill.title}) was left by a `lab` that is "
            f"gone: canceled; {len(waiting)} of its runs still running are kept"
        )
    if waiting:
        on_event(
            f"waiting for {len(waiting)} runs of that backfill to finish (they commit their "
            "outputs; Ctrl-C stops waiting and leaves them running): "
            + ", ".join(_label(r) for r in waiting.values())
        )
    while waiting:
        if stop is not None and stop.is_set():
            out.still_running = list(waiting)
            break
        for run_id in list(waiting):
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                left = waiting.pop(run_id)
                out.waited_runs.append(run_id)
                status = run.status.value if run is not None else "deleted"
                on_event(f"{_label(left)} ended: {status}")
        if waiting:
            fail_dead_runs(instance)  # one that dies while we wait must not hang us
            (stop.wait(poll_s) if stop is not None else time.sleep(poll_s))
    for d in scratch_dirs.remove_leaked(scratch_dirs.default_root()):
        out.removed_dirs.append(str(d))
    if store is not None:
        out.removed_dirs += [str(d) for d in store.remove_leftovers()]
    if out.removed_dirs:
        on_event(f"removed {len(out.removed_dirs)} directories left by processes that died")
    return out
