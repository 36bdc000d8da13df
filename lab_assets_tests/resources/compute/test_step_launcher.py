"""The local disposable-worker step launcher, through real Dagster runs.

Every test here goes through the warm path: one warm worker server per module (its
own socket dir, default preload with torch & co), stopped at the end.
"""

import os
import sys

import pytest
from dagster import execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

from lab_assets_tests.conftest import TESTS_DIR, scratch_leftovers
from lab_assets_tests.handshake import acknowledge_when_logged
from resources.compute.local import warm_server
from resources.storage.local import LocalArtifactStore

pytestmark = pytest.mark.usefixtures("warm_server_dir")


def _run(instance, mode, handshake_dir=""):
    repo = ReconstructableRepository.for_module(
        "lab_assets_tests.code_locations.launcher_defs",
        "defs",
        working_directory=str(TESTS_DIR.parent),
    )
    job = repo.get_reconstructable_job("__ASSET_JOB")
    cfg = {"ops": {"remote_work": {"config": {"mode": mode, "handshake_dir": handshake_dir}}}}
    return execute_job(job, instance=instance, run_config=cfg, raise_on_error=False)


def _messages(instance, run_id):
    return [e.user_message or "" for e in instance.all_logs(run_id)]


def _worker_pids(msgs):
    """(pid, ppid) from the step's own "worker pid P ppid Q scratch S" line."""
    words = next(m for m in msgs if m.startswith("worker pid")).split()
    return int(words[2]), int(words[4])


def _server_pid():
    """The pid of the module's server (the one the launcher uses: same python and preload)."""
    _, pid = warm_server.ensure_server(sys.executable, warm_server.DEFAULT_PRELOAD, 600)
    return pid


def test_success_runs_in_another_process_relays_and_cleans_up(lab_env, instance):
    with _run(instance, "ok") as result:
        assert result.success
        msgs = _messages(instance, result.run_id)
    pid, ppid = _worker_pids(msgs)
    assert pid != os.getpid()
    assert ppid != os.getpid()  # forked by the warm server, not started by this process
    assert any("runs in a warm worker" in m for m in msgs)
    assert any("Started execution of step" in m for m in msgs)
    store = LocalArtifactStore(str(lab_env["storage"]), "launcher")
    assert (store.local_path("remote_work", None) / "result.txt").read_text() == "done"
    assert scratch_leftovers(lab_env["scratch"]) == []


def test_steps_in_a_row_are_forked_by_the_same_server(lab_env, instance):
    parents = []
    for _ in range(2):
        with _run(instance, "ok") as result:
            assert result.success
            parents.append(_worker_pids(_messages(instance, result.run_id))[1])
    assert parents[0] == parents[1] == _server_pid()
    assert scratch_leftovers(lab_env["scratch"]) == []


def test_step_failure_is_reported_and_scratch_deleted(lab_env, instance):
    with _run(instance, "fail") as result:
        assert not result.success
        failures = [e for e in result.all_events if e.is_step_failure]
    assert "asset failed on purpose" in str(failures[0].step_failure_data.error.to_string())
    assert scratch_leftovers(lab_env["scratch"]) == []
    assert not LocalArtifactStore(str(lab_env["storage"]), "launcher").is_complete(
        "remote_work", None
    )


@pytest.mark.parametrize(
    ("mode", "how"),
    [
        ("crash", "exited with code 3"),
        ("sigkill", "was ended by SIGKILL (signal 9) (out of memory?"),
    ],
)
def test_worker_crash_fails_the_step_with_its_output_and_spares_the_server(
    lab_env, instance, mode, how
):
    server = _server_pid()
    with _run(instance, mode) as result:
        assert not result.success
        err = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    text = err.to_string()
    assert how in text and "before the step ended" in text
    assert "worker pid" in text  # the tail of the worker's own output is attached
    assert scratch_leftovers(lab_env["scratch"]) == []
    with _run(instance, "ok") as result:  # the same server serves the next step
        assert result.success
        assert _worker_pids(_messages(instance, result.run_id))[1] == server


def test_a_signal_that_ends_the_worker_is_named_in_the_failure(lab_env, instance):
    with _run(instance, "sigterm") as result:
        assert not result.success
        err = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    assert "DagsterExecutionInterruptedError: step worker ended by SIGTERM" in err.to_string()
    assert scratch_leftovers(lab_env["scratch"]) == []


def test_events_are_relayed_while_the_step_runs(lab_env, instance, tmp_path):
    """The worker blocks until the test sees its log line in the host run: only a live relay
    lets it finish."""
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    with acknowledge_when_logged(instance, handshake):
        with _run(instance, "handshake", str(handshake)) as result:
            assert result.success, [e.message for e in result.all_events if e.is_step_failure]
    assert (handshake / "ack").exists()


def test_torch_trains_in_a_forked_worker_with_the_thread_cap(lab_env, instance, monkeypatch):
    monkeypatch.setenv("LAB_TORCH_THREADS", "1")
    with _run(instance, "torch") as result:
        assert result.success, [e.message for e in result.all_events if e.is_step_failure]
        msgs = _messages(instance, result.run_id)
    line = next(m for m in msgs if m.startswith("torch ok"))
    assert "preloaded=True threads=1" in line  # torch came from the server, capped at 1
    first, last = (float(x) for x in line.split("loss ")[1].split(" -> "))
    assert last < first
    assert scratch_leftovers(lab_env["scratch"]) == []
