"""The one engine on GCE: `lab materialize` keeps to the GPU quota, and Ctrl-C deletes the VMs.

Each test runs `lab materialize` exactly as a researcher does (a subprocess; the
daemon it starts launches the backfill's runs through Dagster's run queue) on a GCE
experiment (`experiments/gce_quota.yaml`: 4 adapter partitions, a GPU quota
`sweep.max_gpu_in_flight` of 2), against the fake Compute Engine and the GCS
emulator. The fake's "VMs" run the real agent, so each adapter really trains (a tiny
model); the fake's `history` records when each VM was inserted and when it was gone,
so "how many VMs at once" is exact, not sampled.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG

from lab_assets.experiment.load import load_experiment
from lab_assets.names import ADAPTER
from lab_assets.orchestration.watch import IN_PROGRESS
from lab_assets_tests.conftest import TESTS_DIR, patched_env
from lab_assets_tests.gce_fixtures import BUCKET, messages
from resources.compute.gce.vm_spec import label_value

pytest_plugins = ["lab_assets_tests.gce_fixtures"]

EXPERIMENT = TESTS_DIR / "experiments" / "gce_quota.yaml"
QUOTA = 2


class VmLeaked(AssertionError):
    """A VM of the backfill outlived `lab materialize`."""


def _start_lab_materialize(tmp_path: Path) -> tuple[subprocess.Popen, dict, Path]:
    """`lab materialize` of the GCE experiment into fresh GCS storage, scratch and instance.

    The environment is this process's, where the fixtures point Compute Engine at the
    fake and GCS at the emulator; output goes to a file (read at the end)."""
    env = {
        **os.environ,
        # A prefix of its own: nothing an earlier test (or run) wrote counts as done.
        "LAB_STORAGE_ROOT": f"gs://{BUCKET}/engine-{uuid.uuid4().hex[:12]}",
        "LAB_SCRATCH_ROOT": str(tmp_path / "scratch"),
        "DAGSTER_HOME": str(tmp_path / "home"),
    }
    (tmp_path / "scratch").mkdir()
    out = tmp_path / "lab.out"
    with open(out, "w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lab_assets.cli",
                "materialize",
                "--experiment",
                str(EXPERIMENT),
            ],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # SIGINT reaches `lab` alone, as Ctrl-C would
        )
    return proc, env, out


@functools.cache
def _experiment_label() -> str:
    return label_value(load_experiment(EXPERIMENT).name)


def _ours(fake, since: int) -> list[dict]:
    """Bodies of the VMs inserted since history entry `since` for this experiment."""
    exp = _experiment_label()
    with fake.lock:
        return [
            body
            for _, change, body in fake.history[since:]
            if change > 0 and body.get("labels", {}).get("experiment") == exp
        ]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture(scope="module")
def materialized(fake_gce, tmp_path_factory) -> dict:
    """`lab materialize` of the GCE experiment, once for the tests that read what it left."""
    fake_gce.clear_stockouts()
    since = len(fake_gce.history)
    proc, env, out = _start_lab_materialize(tmp_path_factory.mktemp("gce-materialize"))
    try:
        rc = proc.wait(timeout=600)
    finally:
        _kill(proc)
    return {"rc": rc, "env": env, "text": out.read_text(errors="replace"), "since": since}


def test_a_gce_backfill_runs_as_many_vms_at_once_as_the_quota_and_no_more(materialized, gce):
    exp = load_experiment(EXPERIMENT)
    assert exp.file.sweep.max_gpu_in_flight == QUOTA and len(exp.runs) == 4
    rc, env, text, since = (materialized[k] for k in ("rc", "env", "text", "since"))
    assert rc == 0, text[-5000:]

    with patched_env({"DAGSTER_HOME": env["DAGSTER_HOME"]}), DagsterInstance.get() as instance:
        backfills = instance.get_backfills()
        assert len(backfills) == 1  # one `lab materialize`, one backfill
        backfill = backfills[0]
        assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS
        runs = instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: backfill.backfill_id}))
        assert len(runs) == len(instance.get_runs())  # every run is the backfill's
        assert runs and all(r.status == DagsterRunStatus.SUCCESS for r in runs)
        adapter_runs = [
            r for r in runs if ADAPTER in [k.to_user_string() for k in r.asset_selection or []]
        ]
        keys = {f"{m}|{r}" for m in exp.model_ids for r in exp.run_ids}
        assert {r.tags[PARTITION_NAME_TAG] for r in adapter_runs} == keys
        assert instance.get_materialized_partitions(AssetKey(ADAPTER)) == keys
    n = len(keys) * 2 + 2 * len(exp.model_ids) + 1  # adapters + features, models, classification
    assert f"{n}/{n} asset partitions materialised, 0 failed" in text

    # Every adapter partition trained on a VM of its own; the VMs, from their insert until
    # they were gone, never numbered more than the quota, and did reach it.
    run_labels = {label_value(r.run_id) for r in adapter_runs}
    vms = [b for b in _ours(gce, since) if b["labels"]["run"] in run_labels]
    assert {b["labels"]["run"] for b in vms} == run_labels
    assert len(vms) == len(adapter_runs), [b["name"] for b in vms]  # no retry, no extra VM
    names = {b["name"] for b in vms}
    peak = gce.peak_alive(lambda body: body["name"] in names)
    assert peak == QUOTA, f"{peak} VMs alive at once (quota {QUOTA})"
    assert not [i.name for i in gce.live() if i.name in names]  # all deleted


def test_lab_launch_rebuilds_one_partition_on_a_vm_in_the_zone_asked(materialized, gce):
    """`lab launch` (not a dry run): one partition, as a one-partition backfill, with the
    command line's override (`--zone`) reaching the VM."""
    assert materialized["rc"] == 0, materialized["text"][-3000:]
    exp = load_experiment(EXPERIMENT)
    key = f"{exp.model_ids[0]}|{exp.run_ids[0]}"
    env, since = materialized["env"], len(gce.history)
    proc = subprocess.run(
        [sys.executable, "-m", "lab_assets.cli", "launch", "--experiment", str(EXPERIMENT)]
        + ["--asset", ADAPTER, "--partition", key, "--zone", "us-central1-b"],
        env=env,
        cwd=Path(env["DAGSTER_HOME"]).parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    vms = _ours(gce, since)
    assert len(vms) == 1, [b["name"] for b in vms]
    assert vms[0]["machineType"].startswith("zones/us-central1-b/")
    assert vms[0]["name"] not in {i.name for i in gce.live()}  # deleted
    with patched_env({"DAGSTER_HOME": env["DAGSTER_HOME"]}), DagsterInstance.get() as instance:
        (launch,) = [b for b in instance.get_backfills() if b.title.startswith("lab launch")]
        assert launch.title == f"lab launch: {ADAPTER}[{key}]"
        assert launch.status == BulkActionStatus.COMPLETED_SUCCESS
        (run,) = instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: launch.backfill_id}))
        assert run.status == DagsterRunStatus.SUCCESS and run.tags[PARTITION_NAME_TAG] == key
        assert label_value(run.run_id) == vms[0]["labels"]["run"]


def _launched(instance, fake, since: int) -> list:
    """Our VMs that are RUNNING (their agent started) and that their run's launcher has
    logged as created: past the insert, tracked by the launcher for deletion."""
    run_of = {b["name"]: b["labels"]["run"] for b in _ours(fake, since)}
    return [
        i
        for i in fake.live()
        if i.name in run_of
        and i.status == "RUNNING"
        and i.proc is not None
        and any(f"VM {i.name} created in" in m for m in messages(instance, run_of[i.name]))
    ]


def _assert_canceled_and_clean(text: str, rc: int, fake, since: int, env: dict) -> list[dict]:
    """`lab` said it canceled; none of the backfill's VMs is left, each deleted by its run's
    launcher; no run is left in progress. Returns the VMs' bodies."""
    assert rc == 130, text[-5000:]
    assert "interrupted: canceling the backfill" in text
    assert "canceled:" in text and "nothing is left running" in text
    vms = _ours(fake, since)
    assert vms
    names = {b["name"] for b in vms}
    left = [(i.name, i.status) for i in fake.live() if i.name in names]
    if left:
        raise VmLeaked(f"VMs left after Ctrl-C: {left}")
    with fake.lock:
        gone = {b["name"] for _, change, b in fake.history[since:] if change < 0}
        deleted = {path.rsplit("/", 1)[1] for method, path in fake.calls if method == "DELETE"}
    assert names <= gone  # deleted (gone from the project), not merely stopped
    # ... by an instances.delete (the step launchers': the reaper's first and only tick
    # came before any VM, and maxRunDuration is far off).
    assert names <= deleted
    with patched_env({"DAGSTER_HOME": env["DAGSTER_HOME"]}), DagsterInstance.get() as instance:
        runs = instance.get_runs()
        in_progress = [(r.run_id, r.status) for r in runs if r.status in IN_PROGRESS]
        assert not in_progress
        for b in vms:
            run = instance.get_run_by_id(b["labels"]["run"])
            assert run.status == DagsterRunStatus.CANCELED, messages(instance, run.run_id)[-20:]
        assert instance.get_backfills()[0].status == BulkActionStatus.CANCELED
    return vms


def test_ctrl_c_on_a_gce_backfill_deletes_its_vms(gce, tmp_path):
    since = len(gce.history)
    proc, env, out = _start_lab_materialize(tmp_path)
    try:
        # Wait until the quota is full: two step VMs up, each running its agent and past
        # its insert. Then no insert is in flight (no third run can start), and Ctrl-C
        # has two VMs to delete. (Ctrl-C during an insert: the next test.)
        deadline = time.monotonic() + 300
        up: list = []
        while len(up) < QUOTA and time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text(errors="replace")[-5000:]
            time.sleep(0.2)
            if _ours(gce, since):  # by now `lab` and its daemon have set the instance up
                with (
                    patched_env({"DAGSTER_HOME": env["DAGSTER_HOME"]}),
                    DagsterInstance.get() as instance,
                ):
                    up = _launched(instance, gce, since)
        assert len(up) == QUOTA, f"{len(up)} step VMs up in time"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:
        _kill(proc)
    vms = _assert_canceled_and_clean(out.read_text(errors="replace"), rc, gce, since, env)
    assert {i.name for i in up} <= {b["name"] for b in vms}
    # their startup scripts and agents (the lab-agent unit, and with it the step) ended
    assert all(i.proc.poll() is not None for i in up)
    assert not [u.name for i in up if i.systemd for u in i.systemd.units.values() if u.running()]


def test_ctrl_c_while_a_vm_is_being_created_deletes_it(gce, tmp_path):
    """Real inserts take tens of seconds until their operation is DONE: Ctrl-C then."""
    since = len(gce.history)
    saved = gce.op_delay_s
    gce.op_delay_s = 10.0  # every operation DONE 10 s after it was made
    proc = None
    try:
        proc, env, out = _start_lab_materialize(tmp_path)
        deadline = time.monotonic() + 300
        while not _ours(gce, since) and time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text(errors="replace")[-5000:]
            time.sleep(0.1)
        inserting = _ours(gce, since)
        assert inserting, "no VM insert in time"
        assert all(gce.find(b["name"]).status == "PROVISIONING" for b in inserting)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
        _assert_canceled_and_clean(out.read_text(errors="replace"), rc, gce, since, env)
    finally:
        gce.op_delay_s = saved
        if proc is not None:
            _kill(proc)
        for i in gce.live():  # leave no VM of this test to the next
            if i.name in {b["name"] for b in _ours(gce, since)}:
                gce._delete(i)


def test_a_backfill_launched_as_the_ui_does_keeps_to_the_quota_too(gce, tmp_path):
    """No `lab` involved: a daemon serves the instance (as under `dagster dev`) and a
    backfill of every partition is written to the instance, as the UI's "Materialize
    all" does. The `gpu` pool's limit must come from the definitions loading alone."""
    from lab_assets.orchestration.backfill import every_partition, submit_backfill
    from lab_assets.orchestration.instance import DAGSTER_YAML
    from lab_assets.orchestration.watch import DONE_STATUSES

    exp = load_experiment(EXPERIMENT)
    since = len(gce.history)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    env = {
        **os.environ,
        "LAB_STORAGE_ROOT": f"gs://{BUCKET}/engine-{uuid.uuid4().hex[:12]}",
        "LAB_SCRATCH_ROOT": str(tmp_path / "scratch"),
        "LAB_EXPERIMENT": str(EXPERIMENT),
        "DAGSTER_HOME": str(home),
    }
    (tmp_path / "scratch").mkdir()
    with patched_env(env), DagsterInstance.get():
        pass  # the instance's storage exists before the daemon opens it (no creation race)
    with open(tmp_path / "daemon.log", "w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lab_assets.orchestration.daemon_main"]
            + ["-m", "lab_assets.definitions"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with patched_env(env), DagsterInstance.get() as instance:
            deadline = time.monotonic() + 300
            # the daemon's code server loaded the definitions: they set the limit
            while instance.event_log_storage.get_concurrency_info("gpu").slot_count != QUOTA:
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the gpu pool limit was never set"
                time.sleep(0.5)
            backfill_id = submit_backfill(instance, exp, every_partition(exp), "as the UI")
            deadline = time.monotonic() + 600
            while instance.get_backfill(backfill_id).status not in DONE_STATUSES:
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the backfill did not end in time"
                time.sleep(1)
            assert instance.get_backfill(backfill_id).status == BulkActionStatus.COMPLETED_SUCCESS
            runs = instance.get_runs(RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
            run_labels = {
                label_value(r.run_id)
                for r in runs
                if ADAPTER in [k.to_user_string() for k in r.asset_selection or []]
            }
    finally:
        _kill(daemon)
    assert len(run_labels) == len(exp.runs)
    names = {b["name"] for b in _ours(gce, since) if b["labels"]["run"] in run_labels}
    assert len(names) == len(exp.runs)
    peak = gce.peak_alive(lambda body: body["name"] in names)
    assert peak == QUOTA, f"{peak} VMs alive at once (quota {QUOTA})"
