"""`lab` processes that die or run at the same time never block or duplicate each other.

A `lab` that dies mid-sweep leaves nothing that blocks or duplicates the next one:
`lab sweep` is SIGKILLed while adapters train (its daemon exits with it), and one of
its run workers is SIGKILLed too (a run that can never end by itself); the other run
worker, forked apart from `lab`, keeps going. The next `lab sweep` must: fail the
dead run (nothing left STARTED, so no pool slot held), cancel the orphaned backfill,
wait for the live run (its partition is kept, not trained twice), remove scratch and
staging directories of dead processes, and build everything else. Two sweeps started
together train each partition once.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.execution.backfill import BulkActionStatus

from lab_assets.names import OWNER_TAG, RUN_WORKER_TAG
from lab_assets_tests.conftest import (
    SMALL_EXPERIMENT,
    adapter_trainings,
    lab_process_env,
    patched_env,
)
from resources import procs


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _started_adapter_runs(instance) -> list:
    runs = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    return [
        r for r in runs if "|" in r.tags.get("dagster/partition", "") and RUN_WORKER_TAG in r.tags
    ]


def test_a_killed_lab_leaves_nothing_that_blocks_or_duplicates_the_next_sweep(tmp_path):
    exp = tmp_path / "small-long.yaml"  # long enough to be killed mid-training
    exp.write_text(SMALL_EXPERIMENT.read_text().replace("steps: 4\n", "steps: 400\n"))
    env = lab_process_env(tmp_path, exp)
    cmd = [sys.executable, "-m", "lab_assets.cli", "sweep"]
    first = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = tmp_path / "home" / "lab" / "daemon.log"
    try:
        with patched_env({"DAGSTER_HOME": env["DAGSTER_HOME"]}):
            deadline = time.monotonic() + 600
            victim = None
            while victim is None:
                assert time.monotonic() < deadline, "no adapter run started in time"
                assert first.poll() is None
                time.sleep(0.5)
                if not log.exists() or "daemons" not in log.read_text(errors="replace"):
                    continue
                with DagsterInstance.get() as instance:
                    started = _started_adapter_runs(instance)
                if started:
                    victim = started[0]
            first.kill()  # SIGKILL: `lab` runs no cleanup
            first.wait()
            worker = json.loads(victim.tags[RUN_WORKER_TAG])
            if procs.start_time(worker["pid"]) == worker["start"]:
                os.kill(worker["pid"], signal.SIGKILL)  # a run that can never end by itself

            # What other dead processes left: a scratch dir and a local commit's staging dir.
            leaked = tmp_path / "scratch" / "lab-deadbeef-leaked"
            leaked.mkdir()
            me = {"host": socket.gethostname(), "pid": _dead_pid(), "start": "1"}
            (leaked / "owner.json").write_text(json.dumps(me))
            host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
            staging = (
                tmp_path
                / "storage"
                / "small"
                / "adapter"
                / f".staging-x-{host}.{me['pid']}-0123abcd"
            )
            staging.mkdir(parents=True)
            live = (
                tmp_path
                / "storage"
                / "small"
                / "adapter"
                / f".staging-y-{host}.{os.getpid()}-0123abcd"
            )
            live.mkdir()

            second = subprocess.run(
                cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
            )
            out = second.stdout
            assert second.returncode == 0, out[-3000:] + second.stderr[-3000:]
            assert "was left by a `lab` that is gone: canceled" in out, out[:3000]
            assert not leaked.exists() and not staging.exists()
            assert live.exists()  # a live committer's staging dir is left alone

            with DagsterInstance.get() as instance:
                runs = instance.get_runs()
                in_progress = [r.run_id for r in runs if not r.is_finished]
                assert in_progress == []  # nothing STARTED, queued or canceling: no slot held
                dead = instance.get_run_by_id(victim.run_id)
                if dead.status != DagsterRunStatus.SUCCESS:  # (it may have finished first)
                    assert dead.status == DagsterRunStatus.FAILURE
                    assert f"run {victim.run_id[:8]}" in out and "was left STARTED" in out
                backfills = instance.get_backfills()
                assert all(OWNER_TAG in b.tags for b in backfills)  # each names its submitter
                statuses = [b.status for b in backfills]
                assert BulkActionStatus.CANCELED in statuses  # the orphan
                assert BulkActionStatus.COMPLETED_SUCCESS in statuses  # the second sweep's
                # Each adapter partition was trained to success exactly once: the run that
                # outlived `lab` was waited for and kept, not launched a second time.
                succeeded = Counter(
                    r.tags["dagster/partition"]
                    for r in runs
                    if r.status == DagsterRunStatus.SUCCESS
                    and any(k.to_user_string() == "adapter" for k in r.asset_selection or ())
                )
                assert len(succeeded) == 8 and set(succeeded.values()) == {1}, succeeded
    finally:
        if first.poll() is None:
            first.kill()


def test_two_sweeps_started_together_train_each_partition_once(tmp_path):
    """Two `lab sweep` processes on one storage root and one instance: the second waits
    for the first to submit its backfill, finds every partition in flight and launches
    nothing; each adapter is trained by exactly one run."""
    env = lab_process_env(tmp_path)
    (tmp_path / "home").mkdir()
    cmd = [sys.executable, "-m", "lab_assets.cli", "sweep"]
    procs_ = [
        subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs_]
    assert [p.returncode for p in procs_] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    assert sum("nothing else to launch" in o for o in outs) == 1, outs
    with patched_env({"DAGSTER_HOME": env["DAGSTER_HOME"]}), DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(instance.get_backfills()) == 1
    trained = adapter_trainings(runs)
    assert len(trained) == 8 and set(trained.values()) == {1}, trained
