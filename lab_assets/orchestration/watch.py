"""Following a backfill to its end: progress, live step lines, and Ctrl-C that cleans up.

Progress is Dagster's own bookkeeping: the backfill's materialised and failed asset
partitions, and its runs (tag `dagster/backfill`). For each run in progress the
watcher shows its partition and the latest training line it logged (`step k/N loss
x`). Ctrl-C (or SIGTERM) cancels the backfill: queued runs are canceled, running ones
are terminated through the run launcher (their step launchers kill the worker, delete
the scratch directory, and on GCE delete the VM), and the watcher waits until no run
is left in progress.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.events import DagsterEventType
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG

IN_PROGRESS = {
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
}
DONE_STATUSES = {
    BulkActionStatus.COMPLETED,
    BulkActionStatus.COMPLETED_SUCCESS,
    BulkActionStatus.COMPLETED_FAILED,
    BulkActionStatus.FAILED,
    BulkActionStatus.CANCELED,
}
_STEP_LINE = re.compile(r"step \d+/\d+.*")


@dataclass
class Progress:
    """A snapshot of a backfill, as the CLI shows it."""

    status: BulkActionStatus
    total: int  # asset partitions targeted
    done: int  # materialised
    failed: int  # failed, or not materialised because something upstream failed
    runs: list[DagsterRun] = field(default_factory=list)
    running: dict[str, str] = field(default_factory=dict)  # partition -> latest step line

    @property
    def finished(self) -> bool:
        return self.status in DONE_STATUSES

    def count(self, *statuses: DagsterRunStatus) -> int:
        return sum(1 for r in self.runs if r.status in statuses)


def backfill_runs(instance: DagsterInstance, backfill_id: str) -> list[DagsterRun]:
    return list(instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: backfill_id})))


def snapshot(instance: DagsterInstance, backfill_id: str, total: int) -> Progress:
    backfill = instance.get_backfill(backfill_id)
    data = backfill.asset_backfill_data
    done = data.materialized_subset.num_partitions_and_non_partitioned_assets if data else 0
    failed = (
        data.failed_and_downstream_subset.num_partitions_and_non_partitioned_assets if data else 0
    )
    runs = backfill_runs(instance, backfill_id)
    running = {
        r.tags.get(PARTITION_NAME_TAG, "(unpartitioned)"): _latest_step_line(instance, r.run_id)
        for r in runs
        if r.status == DagsterRunStatus.STARTED
    }
    return Progress(backfill.status, total, done, failed, runs, running)


def _latest_step_line(instance: DagsterInstance, run_id: str) -> str:
    records = instance.event_log_storage.get_records_for_run(
        run_id, limit=50, ascending=False
    ).records
    for rec in records:
        msg = rec.event_log_entry.user_message or ""
        m = _STEP_LINE.search(msg)
        if m:
            return m.group(0)[:60]
    return "starting"


_HOLDING = (DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING)


def pool_wait(instance: DagsterInstance, backfill_id: str, runs: list[DagsterRun]) -> str | None:
    """Why this backfill's queued runs wait, when runs outside it hold their pool: one line
    naming the pool, its limit and the runs holding it; None when nothing outside does."""
    queued = [r for r in runs if r.status == DagsterRunStatus.QUEUED]
    pools = sorted({p for r in queued for p in _pools(r)})
    if not pools:
        return None
    limits = {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}
    holding = list(instance.get_runs(RunsFilter(statuses=list(_HOLDING))))
    out = []
    for pool in pools:
        holders = [r for r in holding if pool in _pools(r)]
        others = [r for r in holders if r.tags.get(BACKFILL_ID_TAG) != backfill_id]
        limit = limits.get(pool)
        if not others or limit is None or len(holders) < limit:
            continue
        names = ", ".join(
            f"run {r.run_id[:8]} [{r.tags.get(PARTITION_NAME_TAG, '-')}]"
            + (f" of backfill {r.tags[BACKFILL_ID_TAG]}" if BACKFILL_ID_TAG in r.tags else "")
            for r in others[:4]
        )
        more = f" and {len(others) - 4} more" if len(others) > 4 else ""
        out.append(
            f"waiting for pool '{pool}': {len(holders)}/{limit} slots held, "
            f"{len(others)} by runs outside this backfill ({names}{more}); Ctrl-C stops"
        )
    return "; ".join(out) or None


def _pools(run: DagsterRun) -> set[str]:
    roc = run.run_op_concurrency
    return set(roc.all_pools or roc.root_key_counts) if roc is not None else set()


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while following a backfill."""


class DaemonGone(RuntimeError):
    """No daemon serves the instance any more (its heartbeat stopped)."""


def wait_for_backfill(
    instance: DagsterInstance,
    backfill_id: str,
    total: int,
    on_progress: Callable[[Progress], None],
    poll_s: float = 1.0,
    daemon_alive: Callable[[], bool] = lambda: True,
    stop: threading.Event | None = None,
    on_wait: Callable[[str], None] | None = None,
    wait_check_s: float = 10.0,
) -> Progress:
    """Poll until the backfill ends.

    `on_wait` hears, when it changes, why queued runs wait on a pool held by others.

    `daemon_alive` going False stops the wait with an error; `stop` being set (by a
    signal handler) raises `Interrupted`. A flag, not a `KeyboardInterrupt` raised
    wherever the signal lands: library code on the way (database calls) must not be
    able to swallow it.
    """
    said, checked = None, 0.0
    while True:
        if stop is not None and stop.is_set():
            raise Interrupted
        progress = snapshot(instance, backfill_id, total)
        on_progress(progress)
        if on_wait is not None and time.monotonic() - checked >= wait_check_s:
            checked = time.monotonic()
            why = pool_wait(instance, backfill_id, progress.runs)
            if why and why != said:
                on_wait(why)
            said = why
        if progress.finished and not progress.count(*IN_PROGRESS):
            return progress
        if not daemon_alive():
            raise DaemonGone(
                "no Dagster daemon serves this instance any more (its heartbeat stopped); "
                f"backfill {backfill_id} is left as it is: start `dagster dev` or rerun `lab`"
            )
        if stop is not None:
            stop.wait(poll_s)
        else:
            time.sleep(poll_s)


def cancel_backfill(
    instance: DagsterInstance, backfill_id: str, timeout_s: float = 120, reask_s: float = 10
) -> tuple[int, int]:
    """Cancel the backfill and its runs; wait until none is in progress.

    A termination request can miss a run that is still starting (its process is not
    yet there to receive it), so it is repeated every `reask_s`. Runs that no process
    ever answered for by `timeout_s` (queued, starting or stuck canceling) are recorded
    as canceled, so none is left looking alive. Returns (queued runs canceled, running
    runs terminated).
    """
    backfill = instance.get_backfill(backfill_id)
    if backfill.status not in DONE_STATUSES:
        instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELING))
    queued = {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED}
    canceled: set[str] = set()
    terminated: set[str] = set()
    asked_at: dict[str, float] = {}
    quiet = 0  # polls in a row with nothing in progress: the daemon may still be submitting
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and quiet < 3:
        _keep_canceling(instance, backfill_id)
        active = [r for r in backfill_runs(instance, backfill_id) if r.status in IN_PROGRESS]
        quiet = 0 if active else quiet + 1
        for run in active:
            if time.monotonic() - asked_at.get(run.run_id, -1e9) < reask_s:
                continue
            asked_at[run.run_id] = time.monotonic()
            if run.status in queued:
                instance.run_coordinator.cancel_run(run.run_id)
                canceled.add(run.run_id)
            else:
                _request_termination(instance, run)
                terminated.add(run.run_id)
        time.sleep(1.0)
    for run in backfill_runs(instance, backfill_id):
        if run.status in IN_PROGRESS and run.status != DagsterRunStatus.STARTED:
            instance.report_run_canceled(run, message="lab: canceled; no process answered")
    backfill = instance.get_backfill(backfill_id)
    # COMPLETED_FAILED too: the daemon's own end for a backfill whose runs were canceled
    # when it lost our CANCELING (below); only one that succeeded first is left as it is.
    if backfill.status not in DONE_STATUSES or backfill.status == BulkActionStatus.COMPLETED_FAILED:
        instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELED))
    return len(canceled), len(terminated - canceled)


def _keep_canceling(instance: DagsterInstance, backfill_id: str) -> None:
    """Write CANCELING again if the daemon wrote it over: its backfill iteration (Dagster
    1.13) reads the backfill, checks it is still REQUESTED and writes the whole object
    back, so a CANCELING written in between is lost and it would go on submitting runs."""
    backfill = instance.get_backfill(backfill_id)
    if backfill is not None and backfill.status == BulkActionStatus.REQUESTED:
        instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELING))


def _request_termination(instance: DagsterInstance, run: DagsterRun) -> None:
    try:
        instance.run_launcher.terminate(run.run_id)
    except Exception as e:  # the run's process may be gone already: asked again, then recorded
        instance.report_engine_event(f"lab: termination request failed: {e}", run)


def root_cause_message(error) -> str:
    """The innermost error's message: the user code's exception, not Dagster's wrapper."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def run_failures(instance: DagsterInstance, run: DagsterRun) -> list[str]:
    """Each failed step's innermost error message (the user code's, not Dagster's wrapper)."""
    out = []
    for rec in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE):
        error = rec.dagster_event.step_failure_data.error if rec.dagster_event else None
        if error is not None:
            out.append(f"{rec.step_key}: {root_cause_message(error)}")
    return out
