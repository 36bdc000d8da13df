"""The local disposable-worker step launcher, through real Dagster runs."""

import os

from dagster import execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

from lab_assets_tests.conftest import TESTS_DIR, scratch_leftovers
from lab_assets_tests.handshake import acknowledge_when_logged
from resources.storage.local import LocalArtifactStore


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


def test_success_runs_in_another_process_relays_and_cleans_up(lab_env, instance):
    with _run(instance, "ok") as result:
        assert result.success
        msgs = _messages(instance, result.run_id)
    worker_line = next(m for m in msgs if m.startswith("worker pid"))
    assert int(worker_line.split()[2]) != os.getpid()
    assert any("Started execution of step" in m for m in msgs)
    store = LocalArtifactStore(str(lab_env["storage"]), "launcher")
    assert (store.local_path("remote_work", None) / "result.txt").read_text() == "done"
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


def test_worker_crash_fails_the_step_with_its_output(lab_env, instance):
    with _run(instance, "crash") as result:
        assert not result.success
        err = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    text = err.to_string()
    assert "exited with code 3 before the step ended" in text
    assert "worker pid" in text  # the tail of the worker's own output is attached
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
