"""Warm VMs against the fake Compute Engine and the GCS emulator: a VM whose step ended takes
the next step of its shape, deletes itself when idle, and the reaper judges by life signs.

Each run is a real Dagster run of ``fanout_work[pNN]`` (``code_locations/gce_fanout_defs``)
executed in this process, whose GCE launcher holds the orchestrator lease.
"""

from __future__ import annotations

import threading
import time

from lab_assets_tests.code_locations.gce_fanout_defs import run_config, run_fanout
from lab_assets_tests.gce_fixtures import BUCKET, messages
from resources.compute.gce.api import ComputeApi
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.reaper import LabVm, LifeRules, judge, judge_all
from resources.compute.gce.settings import LaunchSettings
from resources.remote.protocol import CLAIMS_DIR, VMS_DIR

pytest_plugins = ["lab_assets_tests.gce_fixtures"]

STAGING = f"gs://{BUCKET}/fanout"
ZONE = "us-central1-a"


def _observation(instance, run_id) -> dict:
    for e in instance.all_logs(run_id):
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_OBSERVATION":
            md = e.dagster_event.asset_observation_data.asset_observation.metadata
            return {k: getattr(v, "value", v) for k, v in md.items()}
    raise AssertionError(f"no observation in run {run_id}")


def _failure(result) -> str:
    return "\n".join(
        e.step_failure_data.error.to_string() for e in result.all_events if e.is_step_failure
    )


def _vms_of(gce, run_id: str) -> list[dict]:
    return [b for b in gce.inserted if b["labels"].get("run") == run_id]


def _own_shape(disk_gb: int) -> dict:
    """Launcher settings that give a test's VMs a shape of their own (the boot disk is part
    of it): no test claims a VM another test left idle."""
    return {"boot_disk_gb": disk_gb}


def _life(name: str) -> dict | None:
    return Gcs().read_json(f"{STAGING}/{VMS_DIR}/{name}.json")


def test_a_second_partition_of_the_same_shape_reuses_the_idle_vm(gce, gce_instance):
    with run_fanout(
        gce_instance, "p00", run_config(idle_minutes=2, launcher=_own_shape(101), mode="ok")
    ) as first:
        assert first.success, _failure(first)
    (body,) = _vms_of(gce, first.run_id)
    name = body["name"]
    try:
        # The VM outlived its step and offers itself (its life record says idle).
        gce.wait_for(lambda: (_life(name) or {}).get("state") == "idle", 30, "the VM idle")
        assert gce.find(name) is not None
        inserted = len(gce.inserted)
        with run_fanout(
            gce_instance, "p01", run_config(idle_minutes=2, launcher=_own_shape(101), mode="ok")
        ) as second:
            assert second.success, _failure(second)
            msgs = messages(gce_instance, second.run_id)
        assert len(gce.inserted) == inserted  # no VM was created for p01
        assert any(f"reusing warm VM {name}" in m for m in msgs)
        assert any("partition p01 on worker pid" in m for m in msgs)  # p01 ran, on that VM
        first_meta = _observation(gce_instance, first.run_id)
        second_meta = _observation(gce_instance, second.run_id)
        assert first_meta["gce/vm"] == "booted" and second_meta["gce/vm"] == "reused"
        assert second_meta["gce/vm_name"] == name
        # The wait for a reused VM (claim to first event) is far below a boot's.
        assert second_meta["gce/vm_wait_s"] >= 0 and first_meta["gce/vm_wait_s"] > 0
    finally:
        ComputeApi("lab-test-project").delete_instance(ZONE, name)


def test_an_idle_vm_deletes_itself_after_its_idle_time(gce, gce_instance):
    with run_fanout(
        gce_instance, "p02", run_config(idle_minutes=0.05, launcher=_own_shape(102), mode="ok")
    ) as result:
        assert result.success, _failure(result)
        msgs = messages(gce_instance, result.run_id)
    (body,) = _vms_of(gce, result.run_id)
    name = body["name"]
    assert any(f"VM {name} stays warm" in m for m in msgs)
    gce.wait_for(lambda: gce.find(name) is None, 60, "the idle VM to delete itself")
    path = f"/compute/v1/projects/lab-test-project/zones/{ZONE}/instances/{name}"
    deletes = [auth for method, p, auth in gce.authorized if method == "DELETE" and p == path]
    # It deleted itself, as its service account (the metadata server's token): the launcher
    # never sent a delete for it.
    assert deletes and all(a and a.startswith("Bearer ya29.fake-") for a in deletes), deletes
    gcs = Gcs()
    life = _life(name)
    assert life["state"] == "retiring" and life["why"].startswith("idle for 3s"), life
    assert gcs.list(f"{STAGING}/{CLAIMS_DIR}/{name}") == []  # its spent claims cleared
    ledger = [gcs.read_json(u) for u in gcs.list(f"{STAGING}/_gce/ledger")]
    (entry,) = [e for e in ledger if e.get("vm") == name]
    assert entry["state"] == "settled" and entry["settled_by"] == "vm"


def test_idle_minutes_0_is_one_vm_per_step_deleted_by_the_launcher(gce, gce_instance):
    names = []
    for partition in ("p03", "p04"):
        with run_fanout(
            gce_instance, partition, run_config(idle_minutes=0, launcher=_own_shape(103), mode="ok")
        ) as r:
            assert r.success, _failure(r)
            msgs = messages(gce_instance, r.run_id)
        (body,) = _vms_of(gce, r.run_id)
        names.append(body["name"])
        assert any(f"VM {body['name']} deleted" in m for m in msgs)
        assert _observation(gce_instance, r.run_id)["gce/vm"] == "booted"
    assert len(set(names)) == 2
    for name in names:
        assert gce.find(name) is None
        path = f"/compute/v1/projects/lab-test-project/zones/{ZONE}/instances/{name}"
        auths = [a for m, p, a in gce.authorized if m == "DELETE" and p == path]
        assert auths and all(a is None for a in auths)  # by the launcher (anonymous here)


def _settings() -> LaunchSettings:
    """The fan-out location's settings, as the reaper (``lab vms``, the sensor) reads them."""
    return LaunchSettings(
        project="lab-test-project",
        zones=[ZONE],
        machine_type="g2-standard-4",
        gpu_type="nvidia-l4",
        storage_root="/nonexistent",
        experiment="gce",
        staging_root=STAGING,
        heartbeat_s=1.0,
        heartbeat_timeout_s=30.0,
        boot_timeout_s=120.0,
    )


def test_the_reaper_never_deletes_a_vm_whose_agent_is_alive_and_working(
    gce, gce_instance, tmp_path
):
    """The step hangs (waiting for an ack) on its VM; its Dagster run is reported ended
    (as after a killed orchestrator): the reaper keeps the VM while its agent beats."""
    handshake = tmp_path / "hs"
    handshake.mkdir()
    results = []
    cfg = run_config(
        idle_minutes=0, launcher=_own_shape(104), mode="hang", handshake_dir=str(handshake)
    )
    runner = threading.Thread(
        target=lambda: results.append(_run_and_close(gce_instance, "p05", cfg)), daemon=True
    )
    runner.start()
    try:
        inst = gce.wait_for(
            lambda: next(
                (i for i in gce.live() if i.body["labels"].get("partition") == "p05"), None
            ),
            60,
            "the VM of p05",
        )
        gce.wait_for(
            lambda: (_life(inst.name) or {}).get("state") == "working", 60, "its agent working"
        )
        ended = lambda _run_id: "FAILURE"  # noqa: E731 - what a dead orchestrator's run shows
        api = ComputeApi("lab-test-project")
        for _ in range(3):  # over several heartbeats
            verdicts = {v.vm.name: v for v in judge_all(api, Gcs(), _settings(), ended)}
            v = verdicts[inst.name]
            assert not v.reap and v.reason.startswith("agent alive: working"), v
            time.sleep(1.0)
    finally:
        (handshake / "ack").touch()
        runner.join(90)
    assert results and results[0], "the hung step did not finish after its ack"


def _run_and_close(instance, partition, cfg) -> bool:
    with run_fanout(instance, partition, cfg) as r:
        return r.success


def test_the_reaper_judges_by_life_signs():
    now = time.time()
    vm = LabVm("lab-x", ZONE, "RUNNING", now - 600, {"run": "r1"})
    ended = lambda _r: "SUCCESS"  # noqa: E731
    rules = LifeRules(heartbeat_timeout_s=30, boot_timeout_s=120, grace_s=10)

    def verdict(life, max_age=3600.0):
        return judge(vm, ended, max_age, now=now, life=life, rules=rules)

    working = {"state": "working", "t": now - 5, "deadline": now + 3000}
    assert not verdict(working).reap  # its run ended; its agent is alive: kept
    assert verdict({**working, "t": now - 31}).reap  # heartbeat stale
    idle = {"state": "idle", "t": now - 1, "idle_until": now - 11, "deadline": now + 3000}
    assert verdict(idle).reap and "idle past" in verdict(idle).reason
    assert not verdict({**idle, "idle_until": now + 60}).reap
    assert verdict({**working, "deadline": now - 1}).reap  # past its deadline
    assert verdict({"state": "retiring", "t": now - 11, "why": "idle"}).reap  # could not go
    assert verdict(None).reap  # 600 s old and never a life record (boot timeout 120 s)
    young = LabVm("lab-y", ZONE, "RUNNING", now - 30, {})
    assert not judge(young, ended, 3600, now=now, life=None, rules=rules).reap  # booting
    assert verdict(working, max_age=300).reap  # older than the age limit
