"""The one engine: `lab materialize` is one backfill whose runs the daemon's queue runs in parallel.

The session fixture `small_lab` ran `lab materialize` exactly as a researcher does
(a subprocess, no daemon running beforehand); these tests read what it left in the
instance. The Ctrl-C test starts its own `lab materialize` and interrupts it.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG

from lab_assets.names import RUN_WORKER_TAG
from lab_assets.orchestration.daemon import daemon_serves
from lab_assets_tests.conftest import SMALL_EXPERIMENT, patched_env
from resources import procs


def _instance(env):
    return patched_env({"DAGSTER_HOME": env["DAGSTER_HOME"]})


def test_materialize_is_one_backfill_of_every_partition(small_lab):
    exp = small_lab["exp"]
    with _instance(small_lab["env"]), DagsterInstance.get() as instance:
        backfills = instance.get_backfills()
        assert len(backfills) == 1
        backfill = backfills[0]
        assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS
        assert backfill.title == "lab materialize: small"
        # (other tests may add runs to this instance later: count the backfill's own)
        runs = instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: backfill.backfill_id}))
        assert all(r.status == DagsterRunStatus.SUCCESS for r in runs)
        # Every run came from the queue, launched by the daemon: the base model with its
        # spectrum, then per adapter partition its training (+ its features when the
        # daemon requests both in one tick), then the classification.
        assert 2 + len(exp.runs) <= len(runs) <= 2 + 2 * len(exp.runs)
        selected = [k.to_user_string() for r in runs for k in (r.asset_selection or [])]
        assert selected.count("adapter") == len(exp.runs)
        assert selected.count("classification_results") == 1
        assert not daemon_serves(instance)  # the daemon `lab` started is gone
    assert f"backfill {backfill.backfill_id}: 19/19 asset partitions materialised" in (
        small_lab["proc"].stdout
    )


def test_runs_overlap_in_time(small_lab):
    with _instance(small_lab["env"]), DagsterInstance.get() as instance:
        backfill_id = instance.get_backfills()[-1].backfill_id
        records = instance.get_run_records(RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        spans = sorted((r.start_time, r.end_time) for r in records if r.start_time)
    overlaps = sum(1 for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1])
    assert overlaps >= 1, spans


def _forked_workers() -> list[psutil.Process]:
    """Live run and step workers forked by a warm worker server of this interpreter (the
    server's children; another checkout's `lab` on this machine has its own servers).

    Their /proc environ is the server's, so they are found by parentage, not by env."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            cmd = p.cmdline()
            if cmd and cmd[0] == sys.executable and "resources.remote.fork_server" in " ".join(cmd):
                out += [c for c in p.children() if c.status() != psutil.STATUS_ZOMBIE]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _lab_workers(scratch: str) -> list[psutil.Process]:
    """Live processes of this test's lab: daemons, cold runs and workers (by their
    environment) and every forked run or step worker (tests run one lab at a time).

    The warm worker server itself is not one of them: it is shared, and exits when idle."""
    out = _forked_workers()
    for p in psutil.process_iter(["pid"]):
        try:
            if (
                p.pid != os.getpid()
                and p.environ().get("LAB_SCRATCH_ROOT") == scratch
                and "resources.remote.fork_server" not in " ".join(p.cmdline())
            ):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _start_lab_materialize(tmp_path, capture: bool) -> tuple[subprocess.Popen, dict]:
    """`lab materialize` of the small experiment into fresh storage, scratch and instance."""
    env = {
        **os.environ,
        "LAB_STORAGE_ROOT": str(tmp_path / "storage"),
        "LAB_SCRATCH_ROOT": str(tmp_path / "scratch"),
        "DAGSTER_HOME": str(tmp_path / "home"),
        "LAB_EXPERIMENT": str(SMALL_EXPERIMENT),
    }
    (tmp_path / "scratch").mkdir()
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab_assets.cli", "materialize"],
        env=env,
        cwd=tmp_path,
        stdout=out,
        stderr=out,
        text=True,
    )
    return proc, env


def _started_adapter_run(proc: subprocess.Popen, tmp_path):
    """Wait (under $DAGSTER_HOME) until an adapter's run is STARTED; that run."""
    deadline = time.monotonic() + 600
    log = tmp_path / "home" / "lab" / "daemon.log"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
        # Open the instance only once `lab` and its daemon have set it up: two
        # processes creating a new SQLite instance at once would race.
        if not log.exists() or "daemons" not in log.read_text(errors="replace"):
            continue
        with DagsterInstance.get() as instance:
            started = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
            adapters = [r for r in started if "|" in r.tags.get("dagster/partition", "")]
            # (the launcher tags the run with its worker just after the fork)
            run = next((r for r in adapters if RUN_WORKER_TAG in r.tags), None)
        if run is not None:
            return run
    raise AssertionError("no adapter run started in time")


def test_ctrl_c_cancels_the_backfill_and_leaves_nothing_running(tmp_path):
    proc, env = _start_lab_materialize(tmp_path, capture=True)
    try:
        with patched_env({"DAGSTER_HOME": env["DAGSTER_HOME"]}):
            _started_adapter_run(proc, tmp_path)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 130, err[-3000:]
            assert "canceled:" in err and "nothing is left running" in err
            with DagsterInstance.get() as instance:
                runs = instance.get_runs()
                in_progress = [
                    r
                    for r in runs
                    if r.status
                    in (
                        DagsterRunStatus.QUEUED,
                        DagsterRunStatus.STARTING,
                        DagsterRunStatus.STARTED,
                        DagsterRunStatus.CANCELING,
                    )
                ]
                assert not in_progress, [(r.run_id, r.status) for r in in_progress]
                assert any(r.status == DagsterRunStatus.CANCELED for r in runs)
                assert instance.get_backfills()[0].status == BulkActionStatus.CANCELED
        deadline = time.monotonic() + 30
        while _lab_workers(str(tmp_path / "scratch")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _lab_workers(str(tmp_path / "scratch")) == []  # no worker, run or daemon left
        assert os.listdir(tmp_path / "scratch") == []  # every scratch dir deleted
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_daemon_lab_started_dies_with_lab_even_on_sigkill(tmp_path):
    proc, _ = _start_lab_materialize(tmp_path, capture=False)
    log = tmp_path / "home" / "lab" / "daemon.log"

    def daemons():
        out = []
        for p in _lab_workers(str(tmp_path / "scratch")):
            # gone or a zombie (nobody reaps an orphan here): dead either way
            with contextlib.suppress(psutil.NoSuchProcess):
                if "lab_assets.orchestration.daemon_main" in " ".join(p.cmdline()):
                    out.append(p)
        return out

    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (
            log.exists() and "daemons" in log.read_text(errors="replace") and daemons()
        ):
            assert proc.poll() is None
            time.sleep(0.5)
        assert daemons(), "the daemon never started"
        proc.kill()  # SIGKILL: `lab` gets no chance to stop it
        proc.wait()
        deadline = time.monotonic() + 60
        while daemons() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert daemons() == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in daemons():
            p.kill()


def _messages(instance, run_id: str) -> list[str]:
    """Each event's text: a user message, or an engine event's own message."""
    out = []
    for e in instance.all_logs(run_id):
        event = e.dagster_event
        out.append((event.message if event else None) or e.user_message or "")
    return out


def test_every_run_worker_was_forked_warm(small_lab):
    """The lab's run launcher started each run's worker from the warm worker server."""
    with _instance(small_lab["env"]), DagsterInstance.get() as instance:
        backfill_id = instance.get_backfills()[0].backfill_id
        runs = instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        assert runs
        for run in runs:
            worker = json.loads(run.tags[RUN_WORKER_TAG])
            assert worker["pid"] > 0 and worker["start"]
            started = [m for m in _messages(instance, run.run_id) if "Run worker started" in m]
            assert len(started) == 1 and "forked by the warm worker server" in started[0]


def _wait_until_ended(run_id: str):
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with DagsterInstance.get() as instance:
            run = instance.get_run_by_id(run_id)
        if run.is_finished:
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not end: {run.status}")


def test_a_run_whose_worker_is_killed_is_marked_failed_not_left_started(tmp_path):
    """SIGKILL a running adapter's run worker: the daemon's run monitoring asks the
    launcher, finds the worker gone, and fails the run; `lab` reports the failure."""
    proc, env = _start_lab_materialize(tmp_path, capture=True)
    try:
        with patched_env({"DAGSTER_HOME": env["DAGSTER_HOME"]}):
            for _ in range(5):  # a run may end on its own just before the kill: take another
                victim = _started_adapter_run(proc, tmp_path)
                worker = json.loads(victim.tags[RUN_WORKER_TAG])
                if procs.start_time(worker["pid"]) == worker["start"]:  # not a reused pid
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker["pid"], signal.SIGKILL)
                run = _wait_until_ended(victim.run_id)
                if run.status != DagsterRunStatus.SUCCESS:
                    break
            out, err = proc.communicate(timeout=600)
            assert proc.returncode != 0
            with DagsterInstance.get() as instance:
                run = instance.get_run_by_id(victim.run_id)
                assert run.status == DagsterRunStatus.FAILURE
                messages = _messages(instance, run.run_id)
                assert any("run worker" in m and "is gone" in m for m in messages), messages[-5:]
                stuck = instance.get_runs(
                    RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING])
                )
                assert stuck == []
            assert "failed" in err
    finally:
        if proc.poll() is None:
            proc.kill()
