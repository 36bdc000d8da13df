"""The one engine: a `lab` invocation is one backfill, run by Dagster's daemon and run queue.

`run_backfill` sets the pool limits, makes sure a daemon serves the instance
(starting one for the duration if none does), writes the backfill, follows it to
its end, and on Ctrl-C or SIGTERM cancels it so no run is left in progress. The
same backfill could have been launched from the UI: the daemon, the run queue and
the pools treat it the same.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus

from lab_assets.experiment.resolved import Experiment
from lab_assets.orchestration.backfill import AssetPartition, submit_backfill
from lab_assets.orchestration.daemon import daemon_for, daemon_serves
from lab_assets.orchestration.instance import set_pool_limits
from lab_assets.orchestration.watch import (
    DaemonGone,
    Interrupted,
    Progress,
    cancel_backfill,
    snapshot,
    wait_for_backfill,
)


@dataclass
class BackfillResult:
    backfill_id: str
    progress: Progress
    seconds: float
    started_daemon: bool
    canceled: tuple[int, int] | None = None  # (queued canceled, running terminated)

    @property
    def ok(self) -> bool:
        p = self.progress
        return (
            self.canceled is None
            and p.failed == 0
            and p.done == p.total
            and not p.count(DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
        )


@contextmanager
def interrupts_as_flag() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set a flag for the block (the previous handlers come back after)."""
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def run_backfill(
    instance: DagsterInstance,
    exp: Experiment,
    targets: list[AssetPartition],
    title: str,
    on_progress: Callable[[Progress], None],
    on_event: Callable[[str], None] = print,
    tags: dict[str, str] | None = None,
    run_config: dict | None = None,
    on_submitted: Callable[[str], None] | None = None,
) -> BackfillResult:
    """Backfill exactly `targets` through the daemon; returns when it has ended or was canceled."""
    set_pool_limits(instance, exp)
    warm_up = getattr(instance.run_launcher, "warm_up", None)
    if callable(warm_up):
        warm_up()  # the lab's run launcher: its warm server starts while the daemon does
    # (not under $DAGSTER_HOME/logs: the daemon empties that folder when it starts)
    log = Path(instance.root_directory) / "lab" / "daemon.log"
    t0 = time.perf_counter()
    backfill_id: str | None = None
    started_any = False
    while True:
        with daemon_for(instance, exp, log) as started:
            started_any = started_any or started
            on_event(
                "daemon: started for this command" if started else "daemon: using the one running"
            )
            if backfill_id is None:
                backfill_id = submit_backfill(instance, exp, targets, title, tags, run_config)
                if on_submitted is not None:
                    on_submitted(backfill_id)
                on_event(f"backfill {backfill_id}: {len(targets)} asset partitions ({title})")
            with interrupts_as_flag() as stop:
                try:
                    progress = wait_for_backfill(
                        instance,
                        backfill_id,
                        len(targets),
                        on_progress,
                        daemon_alive=lambda: daemon_serves(instance),
                        stop=stop,
                        on_wait=on_event,
                    )
                    canceled = None
                except DaemonGone:
                    if started:
                        raise  # ours died: its log says why (daemon.log)
                    # Someone else's daemon stopped (`dagster dev` closed, or the heartbeat
                    # of a `lab` that was killed): serve the backfill with one of our own.
                    on_event("daemon: the one in use stopped; starting one for this command")
                    continue
                except Interrupted:
                    on_event("interrupted: canceling the backfill and its runs ...")
                    canceled = cancel_backfill(instance, backfill_id)
                    progress = snapshot(instance, backfill_id, len(targets))
                    on_progress(progress)
        return BackfillResult(
            backfill_id, progress, time.perf_counter() - t0, started_any, canceled
        )
