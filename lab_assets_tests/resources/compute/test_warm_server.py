"""The warm worker server's life cycle, with real processes: a SIGKILLed run process
takes its worker with it (and the server deletes the scratch dir), an idle server
exits by itself, and the launcher falls back to a cold subprocess when the warm
path is off or unreachable. Waits are bounded polls of a state, never timings."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from dagster import execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository

from lab_assets_tests.conftest import TESTS_DIR, scratch_leftovers
from lab_assets_tests.resources.compute.conftest import proc_alive
from resources.compute.local import warm_server

PATIENCE_S = 300  # an upper bound for a state to be reached under any load, not a timing


def _wait_for(predicate, what):
    deadline = time.monotonic() + PATIENCE_S
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _run(instance, mode="ok"):
    repo = ReconstructableRepository.for_module(
        "lab_assets_tests.code_locations.launcher_defs",
        "defs",
        working_directory=str(TESTS_DIR.parent),
    )
    job = repo.get_reconstructable_job("__ASSET_JOB")
    cfg = {"ops": {"remote_work": {"config": {"mode": mode, "handshake_dir": ""}}}}
    return execute_job(job, instance=instance, run_config=cfg, raise_on_error=False)


def _messages(instance, run_id):
    return [e.user_message or "" for e in instance.all_logs(run_id)]


def _worker_ppid(msgs):
    return int(next(m for m in msgs if m.startswith("worker pid")).split()[4])


RUN_PROCESS = textwrap.dedent(
    """
    import sys
    from dagster import DagsterInstance, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    repo = ReconstructableRepository.for_module(
        "lab_assets_tests.code_locations.launcher_defs", "defs", working_directory=sys.argv[1]
    )
    job = repo.get_reconstructable_job("__ASSET_JOB")
    cfg = {"ops": {"remote_work": {"config": {"mode": "hang", "handshake_dir": sys.argv[2]}}}}
    with DagsterInstance.get() as instance:
        execute_job(job, instance=instance, run_config=cfg, raise_on_error=False)
    """
)


def test_sigkilled_run_process_takes_its_worker_and_scratch_with_it(
    lab_env, light_server_dir, tmp_path
):
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    script = tmp_path / "run_process.py"
    script.write_text(RUN_PROCESS)
    run = subprocess.Popen(
        [sys.executable, str(script), str(TESTS_DIR.parent), str(handshake)],
        cwd=str(TESTS_DIR.parent),
    )
    try:
        _wait_for(lambda: (handshake / "worker.json").exists() or run.poll() is not None, "worker")
        assert run.poll() is None, "the run process ended before its worker started"
        worker = json.loads((handshake / "worker.json").read_text())
        (sock,) = light_server_dir.glob("*.sock")
        server = warm_server.ping(sock)["pid"]
        assert worker["ppid"] == server != run.pid
        assert os.path.isdir(worker["scratch"])
        run.send_signal(signal.SIGKILL)
        run.wait()
        _wait_for(lambda: not proc_alive(worker["pid"]), "the orphaned worker to die")
        _wait_for(lambda: scratch_leftovers(lab_env["scratch"]) == [], "the server to clean up")
        assert warm_server.ping(sock)["pid"] == server  # the server itself lives on
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def test_idle_server_exits_by_itself(lab_env, instance, light_server_dir, monkeypatch):
    monkeypatch.setenv("LAB_WARM_IDLE_TIMEOUT_S", "0.2")
    with _run(instance) as result:
        assert result.success
        server = _worker_ppid(_messages(instance, result.run_id))
    assert server != os.getpid()
    _wait_for(lambda: not proc_alive(server), "the idle server to exit")
    assert list(light_server_dir.glob("*.sock")) == []  # it unlinked its socket
    with _run(instance) as result:  # the next step starts a new server
        assert result.success
        assert _worker_ppid(_messages(instance, result.run_id)) not in (server, os.getpid())


def test_warm_workers_off_uses_a_cold_subprocess(lab_env, instance, light_server_dir, monkeypatch):
    monkeypatch.setenv("LAB_WARM_WORKERS", "0")
    with _run(instance) as result:
        assert result.success
        msgs = _messages(instance, result.run_id)
    assert _worker_ppid(msgs) == os.getpid()  # started by this (the run) process
    assert any("runs in a cold subprocess worker" in m for m in msgs)
    assert list(light_server_dir.glob("*.sock")) == []  # no server was started
    assert scratch_leftovers(lab_env["scratch"]) == []


def test_unusable_socket_dir_falls_back_to_a_cold_subprocess(
    lab_env, instance, light_server_dir, tmp_path, monkeypatch
):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)  # readable by others: refused
    monkeypatch.setenv("LAB_WARM_SOCKET_DIR", str(shared))
    with _run(instance, "crash") as result:
        assert not result.success
        msgs = _messages(instance, result.run_id)
        err = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error
    assert any("warm worker server unavailable" in m and "0700" in m for m in msgs)
    assert _worker_ppid(msgs) == os.getpid()
    assert "exited with code 3 before the step ended" in err.to_string()
    assert scratch_leftovers(lab_env["scratch"]) == []


def test_a_detached_worker_outlives_its_request_and_runs_the_named_module(
    light_server_dir, tmp_path
):
    """What the run launcher relies on: the named module's `main` runs in the fork, with
    the request's cwd and environment, output to the passed fd, after the requester is gone."""
    pid_file, release, log = tmp_path / "pid", tmp_path / "release", tmp_path / "out.log"
    request = {
        "module": "lab_assets_tests.resources.compute.detached_probe",
        "argv": [str(pid_file), str(release)],
        "cwd": str(TESTS_DIR.parent),
        "env": {**os.environ, "LAB_PROBE": "yes"},
        "label": "probe",
    }
    with open(log, "ab") as out:
        pid, server = warm_server.start_detached(
            sys.executable, ("dagster",), 60, request, out.fileno()
        )
    assert server != os.getpid() and pid != server
    _wait_for(pid_file.exists, "the probe to start")
    assert int(pid_file.read_text()) == pid
    assert proc_alive(pid)  # the request's connection is closed; the worker lives on
    release.touch()
    _wait_for(lambda: not proc_alive(pid), "the probe to exit and be reaped")
    assert f"probe done in {TESTS_DIR.parent} with LAB_PROBE=yes" in log.read_text()
    assert (
        f"worker {pid} exited with code 7"
        in (light_server_dir / next(p.name for p in light_server_dir.glob("*.log"))).read_text()
    )
