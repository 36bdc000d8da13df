"""A `lab` command waiting on a pool says what holds it, and Ctrl-C stops the wait."""

from __future__ import annotations

import threading
import time

import pytest
from dagster import DagsterRunStatus
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.remote_origin import (
    RegisteredCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.storage.dagster_run import DagsterRun, RunOpConcurrency
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG

from lab_assets.orchestration.watch import Interrupted, pool_wait, wait_for_backfill


def _run(instance, run_id: str, status, backfill: str, partition: str) -> DagsterRun:
    """A run holding (or, queued, waiting for) a `cpu` slot."""
    origin = RemoteJobOrigin(
        repository_origin=RemoteRepositoryOrigin(
            code_location_origin=RegisteredCodeLocationOrigin("lab"), repository_name="lab"
        ),
        job_name="adapters_job",
    )
    run = DagsterRun(
        remote_job_origin=origin,
        job_name="adapters_job",
        run_id=run_id,
        status=status,
        tags={BACKFILL_ID_TAG: backfill, PARTITION_NAME_TAG: partition},
        run_op_concurrency=RunOpConcurrency(
            root_key_counts={"cpu": 1}, has_unconstrained_root_nodes=False, all_pools={"cpu"}
        ),
    )
    return instance.add_run(run)


def test_queued_runs_name_the_pool_and_the_runs_outside_that_hold_it(instance):
    instance.event_log_storage.set_concurrency_slots("cpu", 1)
    other = _run(instance, "a" * 36, DagsterRunStatus.STARTED, "theirs", "m|dpo-arith-s0")
    mine = _run(instance, "b" * 36, DagsterRunStatus.QUEUED, "ours", "m|sft-arith-s0")
    why = pool_wait(instance, "ours", [mine])
    assert why is not None
    assert "pool 'cpu'" in why and "1/1 slots held" in why
    assert f"run {other.run_id[:8]} [m|dpo-arith-s0] of backfill theirs" in why
    # A slot free, or held only by this backfill's own runs: nothing to say.
    instance.event_log_storage.set_concurrency_slots("cpu", 2)
    assert pool_wait(instance, "ours", [mine]) is None
    instance.event_log_storage.set_concurrency_slots("cpu", 1)
    instance.report_run_failed(other)
    _run(instance, "c" * 36, DagsterRunStatus.STARTED, "ours", "m|sft-arith-s1")
    assert pool_wait(instance, "ours", [mine]) is None


def test_the_wait_reports_the_pool_once_and_stops_on_ctrl_c(instance, monkeypatch):
    from lab_assets.orchestration import watch

    instance.event_log_storage.set_concurrency_slots("cpu", 1)
    _run(instance, "a" * 36, DagsterRunStatus.STARTED, "theirs", "m|dpo-arith-s0")
    mine = _run(instance, "b" * 36, DagsterRunStatus.QUEUED, "ours", "m|sft-arith-s0")
    progress = watch.Progress(BulkActionStatus.REQUESTED, 2, 0, 0, [mine])
    monkeypatch.setattr(watch, "snapshot", lambda *a: progress)
    said: list[str] = []
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()  # what the Ctrl-C handler does
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        wait_for_backfill(
            instance,
            "ours",
            2,
            lambda p: None,
            poll_s=0.1,
            stop=stop,
            on_wait=said.append,
            wait_check_s=0.2,
        )
    assert time.monotonic() - t0 < 5
    assert len(said) == 1 and "waiting for pool 'cpu'" in said[0]  # said once, not per poll
