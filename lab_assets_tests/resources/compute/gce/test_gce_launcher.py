"""The GCE step launcher through real Dagster runs, against the fake Compute Engine + GCS."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time

from dagster import DagsterInstance

from lab_assets_tests.fakes.fake_compute import REPO_ROOT
from lab_assets_tests.gce_fixtures import (
    BUCKET,
    messages,
    preempt_first_vm_after_checkpoint,
    run_gce_job,
    trained_steps,
)
from lab_assets_tests.handshake import acknowledge_when_logged
from resources.compute.gce.gcs import Gcs

pytest_plugins = ["lab_assets_tests.gce_fixtures"]


def _materialization(result):
    ev = next(e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION")
    return {
        k: getattr(v, "value", v)
        for k, v in ev.step_materialization_data.materialization.metadata.items()
    }


def test_success_relays_records_and_deletes_the_vm(gce, gce_instance, gcs_emulator):
    before = len(gce.inserted)
    with run_gce_job(gce_instance, mode="ok") as result:
        assert result.success, [e.message for e in result.all_events if e.is_step_failure]
        msgs = messages(gce_instance, result.run_id)
        meta = _materialization(result)
    body = gce.inserted[before]
    name = body["name"]
    # the worker ran in the "VM" and its log line arrived in the run, once, as its event
    # (the worker's console echo of it is not relayed a second time)
    assert len([m for m in msgs if "worker pid" in m]) == 1
    assert not [m for m in msgs if " - dagster - " in m]
    levels = {
        (e.user_message or "").split("] ", 1)[-1]: e.level
        for e in gce_instance.all_logs(result.run_id)
        if not e.is_dagster_event
    }
    assert levels["plain worker output"] == logging.INFO
    assert levels["UserWarning: a warning the worker printed"] == logging.WARNING
    assert any(f"VM {name} deleted" in m for m in msgs)
    assert gce.find(name) is None and name in [d["name"] for d in gce.deleted]
    # dead-man switch and spot scheduling as sent to instances.insert
    sched = body["scheduling"]
    assert sched["maxRunDuration"]["seconds"] == "3600"
    assert sched["instanceTerminationAction"] == "DELETE"
    assert sched["provisioningModel"] == "SPOT"
    assert body["labels"]["experiment"] == "gce" and body["labels"]["run"] == result.run_id
    assert meta["gce/zone"] == "us-central1-a"
    assert meta["gce/provisioning"] == "spot"
    assert meta["gce/preemptions"] == 0
    assert meta["gce/vm_seconds"] > 0
    print(json.dumps(meta, indent=1, default=str))
    obs = [
        e
        for e in gce_instance.all_logs(result.run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_OBSERVATION"
    ]
    assert obs
    # the launch's scratch is gone from GCS; the ledger has the settled cost
    gcs = Gcs()
    assert gcs.list(f"gs://lab-test-bucket/gce/_launches/{result.run_id}") == []
    entries = [gcs.read_json(u) for u in gcs.list("gs://lab-test-bucket/gce/_gce/ledger")]
    mine = [e for e in entries if e["run_id"] == result.run_id]
    assert mine and mine[0]["state"] == "settled" and mine[0]["cost_usd"] < 0.01


def _failure_text(result) -> str:
    return next(
        e for e in result.all_events if e.is_step_failure
    ).step_failure_data.error.to_string()


def _vm_of(gce, run_id: str) -> list[dict]:
    return [b for b in gce.inserted if b["labels"].get("run") == run_id]


def test_step_failure_is_reported_and_the_vm_deleted(gce, gce_instance):
    with run_gce_job(gce_instance, mode="fail") as result:
        assert not result.success
        text = _failure_text(result)
    assert "asset failed on purpose" in text
    (body,) = _vm_of(gce, result.run_id)
    assert gce.find(body["name"]) is None
    assert body["name"] in [d["name"] for d in gce.deleted]
    # the failed launch's events and logs stay in GCS for a post-mortem
    kept = Gcs().list(f"gs://{BUCKET}/gce/_launches/{result.run_id}")
    assert any(u.endswith("attempts/1/status.json") for u in kept)


def test_worker_crash_fails_the_step_with_its_output_and_deletes_the_vm(gce, gce_instance):
    with run_gce_job(gce_instance, mode="crash") as result:
        assert not result.success
        text = _failure_text(result)
    assert (
        "ended (exited with code 3)" in text and "worker pid" in text
    )  # the VM's last output attached
    (body,) = _vm_of(gce, result.run_id)
    assert gce.find(body["name"]) is None


def test_events_and_logs_arrive_while_the_step_runs(gce, gce_instance, tmp_path):
    """The step on the VM blocks until the test sees its log line in the host run."""
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    with acknowledge_when_logged(gce_instance, handshake):
        with run_gce_job(gce_instance, mode="handshake", handshake_dir=str(handshake)) as result:
            assert result.success, _failure_text(result)
    assert (handshake / "ack").exists()
    (body,) = _vm_of(gce, result.run_id)
    assert gce.find(body["name"]) is None


def test_zone_failover_uses_and_records_the_next_zone(gce, gce_instance):
    gce.stockout("us-central1-a")  # the insert's operation ends in ZONE_RESOURCE_POOL_EXHAUSTED
    gce.stockout("us-central1-b", code="QUOTA_EXCEEDED", via="http")  # 403 quotaExceeded
    with run_gce_job(gce_instance, mode="ok") as result:
        assert result.success, _failure_text(result)
        meta = _materialization(result)
        msgs = messages(gce_instance, result.run_id)
        obs = [
            e.dagster_event.asset_observation_data.asset_observation.metadata
            for e in gce_instance.all_logs(result.run_id)
            if e.dagster_event and e.dagster_event.event_type_value == "ASSET_OBSERVATION"
        ]
    assert meta["gce/zone"] == "us-central1-c"
    assert meta["gce/machine_type"] == "g2-standard-8"  # the registry's type for that zone
    (body,) = _vm_of(gce, result.run_id)
    assert body["zone"].endswith("/zones/us-central1-c")
    assert any("ZONE_RESOURCE_POOL_EXHAUSTED" in m for m in msgs)
    assert any("quotaExceeded" in m for m in msgs)
    assert "us-central1-a" in obs[0]["gce/zones_without_capacity"].value
    assert gce.find(body["name"]) is None


def test_run_termination_deletes_the_vm(gce, gce_instance, tmp_path):
    handshake = tmp_path / "never-acked"
    handshake.mkdir()
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(gce_instance.root_directory), str(handshake)],
        cwd=str(REPO_ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = gce.wait_for(
            lambda: next((i for i in gce.live() if i.proc is not None), None), 60, "a VM"
        )
        with DagsterInstance.from_ref(gce_instance.get_ref()) as reader:
            gce.wait_for(
                lambda: any(
                    "waiting for ack" in m
                    for run in reader.get_runs()
                    for m in messages(reader, run.run_id)
                ),
                60,
                "the step to be running on the VM",
            )
        driver.send_signal(signal.SIGTERM)  # what terminating the run does to its worker
        out, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert gce.find(body.name) is None, out
    assert body.name in [d["name"] for d in gce.deleted]
    run = gce_instance.get_runs()[0]
    assert run.status.value in ("FAILURE", "CANCELED"), run.status


_DRIVER = f"""
import sys
from dagster import DagsterInstance, execute_job
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._utils.interrupts import setup_interrupt_handlers

setup_interrupt_handlers()  # as a run worker does: SIGTERM interrupts the run
home, handshake = sys.argv[1:3]
repo = ReconstructableRepository.for_module(
    "lab_assets_tests.code_locations.gce_defs", "defs", working_directory={str(REPO_ROOT)!r}
)
cfg = {{"ops": {{"gce_work": {{"config": {{"mode": "hang", "handshake_dir": handshake}}}}}}}}
with DagsterInstance.local_temp(home) as inst:
    with execute_job(
        repo.get_reconstructable_job("__ASSET_JOB"), instance=inst, run_config=cfg,
        raise_on_error=False,
    ) as r:
        print("RESULT", r.success)
"""


def test_preemption_resumes_from_the_checkpoint_on_a_new_vm(gce, gce_instance):
    steps, every = 30, 5
    t, _ = preempt_first_vm_after_checkpoint(gce, 10, grace_s=5.0, timeout_s=60)
    with run_gce_job(
        gce_instance, mode="train", steps=steps, step_s=0.1, checkpoint_every=every
    ) as result:
        assert result.success, _failure_text(result)
        msgs = messages(gce_instance, result.run_id)
        meta = _materialization(result)
    t.join(timeout=5)
    bodies = _vm_of(gce, result.run_id)
    assert [b["name"][-2:] for b in bodies] == ["a1", "a2"]
    assert all(gce.find(b["name"]) is None for b in bodies)
    trained = trained_steps(msgs)
    first = [s for s, a in trained if a == 1]
    second = [s for s, a in trained if a == 2]
    assert first and second and second[-1] == steps
    resumed_from = second[0] - 1
    assert any(f"resuming from checkpoint-{resumed_from}" in m for m in msgs)
    lost = len(trained) - steps  # steps done twice
    assert 0 <= lost <= every, (first, second)
    assert resumed_from >= max(first) - every
    assert meta["gce/preemptions"] == 1
    assert any("was preempted (1/2)" in m for m in msgs)
    print(f"preempted after step {max(first)}, resumed from {resumed_from}, lost {lost} steps")


def test_budget_refuses_a_launch_with_the_numbers(gce, gce_instance):
    gcs = Gcs()
    planted = f"gs://{BUCKET}/gce/_gce/ledger/earlier-run.json"
    spent = sum(gcs.read_json(u)["cost_usd"] for u in gcs.list(f"gs://{BUCKET}/gce/_gce/ledger"))
    gcs.write_json(planted, {"state": "settled", "cost_usd": 2.4, "run_id": "earlier"})
    before = len(gce.inserted)
    try:
        cfg = {"resources": {"step_launcher": {"config": {"budget_usd": 2.5}}}}
        with run_gce_job(gce_instance, run_config=cfg, mode="ok") as result:
            assert not result.success
            text = _failure_text(result)
    finally:
        gcs.client.bucket(BUCKET).blob("gce/_gce/ledger/earlier-run.json").delete()
    assert len(gce.inserted) == before  # no VM was created
    assert "budget refused" in text
    assert f"spent ${spent + 2.4:.2f} so far" in text
    assert "worst case $0.28 ($0.280/h x 1.00 h maxRunDuration" in text
    assert "> budget $2.50" in text


def test_a_vm_that_dies_under_the_step_fails_it_and_is_deleted(gce, gce_instance, tmp_path):
    gcs = Gcs()

    def crash_when_running():
        inst = gce.wait_for(lambda: next((i for i in gce.live() if i.proc), None), 60, "a VM")
        run_id = inst.body["labels"]["run"]
        status = f"gs://{BUCKET}/gce/_launches/{run_id}/gce_work/attempts/1/status.json"
        gce.wait_for(lambda: (gcs.read_json(status) or {}).get("state") == "running", 60, "run")
        gce.crash(inst.name)  # host error: the agent dies, the instance is TERMINATED

    t = threading.Thread(target=crash_when_running, daemon=True)
    t.start()
    with run_gce_job(gce_instance, mode="hang", handshake_dir=str(tmp_path)) as result:
        assert not result.success
        text = _failure_text(result)
    t.join(timeout=5)
    assert "is TERMINATED before the step ended" in text
    (body,) = _vm_of(gce, result.run_id)
    assert gce.find(body["name"]) is None


def test_keep_vm_leaves_the_vm_says_how_to_connect_and_the_reaper_waits(gce, gce_instance):
    from resources.compute.gce.api import ComputeApi
    from resources.compute.gce.reaper import LabVm, judge

    cfg = {"resources": {"step_launcher": {"config": {"keep_vm": True}}}}
    with run_gce_job(gce_instance, run_config=cfg, mode="ok") as result:
        assert result.success, _failure_text(result)
        msgs = "\n".join(messages(gce_instance, result.run_id))
    (body,) = _vm_of(gce, result.run_id)
    name = body["name"]
    try:
        assert gce.find(name) is not None
        assert f"gcloud compute ssh {name} --zone us-central1-a --project lab-test-project" in msgs
        keep_until = int(body["labels"]["lab-keep-until"])
        vm = LabVm(name, "us-central1-a", "RUNNING", time.time(), body["labels"])
        ended = lambda _run_id: "SUCCESS"  # noqa: E731
        assert not judge(vm, ended, max_age_s=10 * 3600).reap
        assert judge(vm, ended, max_age_s=10 * 3600, now=keep_until + 1).reap
    finally:
        ComputeApi("lab-test-project").delete_instance("us-central1-a", name)
