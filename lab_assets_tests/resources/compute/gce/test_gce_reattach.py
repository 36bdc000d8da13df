"""Detached, re-attachable steps: the orchestrator (the process running the GCE launcher) is
SIGKILLed mid-step; the step runs on to its end and commits, the VM deletes itself, and a
re-run of the partition uses the outputs or re-attaches to the running step, never booting
a second VM. Against the fake Compute Engine and the GCS emulator.

The orchestrator is a subprocess running one Dagster run of ``fanout_work[pNN]``
(``code_locations/gce_fanout_defs``) into the test's Dagster instance; the re-run is a
new run in this process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from lab_assets_tests.code_locations.gce_fanout_defs import run_config, run_fanout
from lab_assets_tests.fakes.fake_compute import REPO_ROOT
from lab_assets_tests.gce_fixtures import messages, storage_root

pytest_plugins = ["lab_assets_tests.gce_fixtures"]

_DRIVER = """
import json, sys
from dagster import DagsterInstance
from lab_assets_tests.code_locations.gce_fanout_defs import run_fanout
home, partition, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with DagsterInstance.local_temp(home) as inst:
    with run_fanout(inst, partition, cfg) as r:
        print("RESULT", r.success, flush=True)
"""


def _steps(progress: Path) -> list[int]:
    try:
        return [int(line.split()[1]) for line in progress.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def _start_and_kill(gce, instance, partition: str, cfg: dict, progress: Path):
    """Start the orchestrator, SIGKILL it once the step trains on its VM; returns the VM."""
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(instance.root_directory), partition, json.dumps(cfg)],
        cwd=str(REPO_ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        inst = gce.wait_for(
            lambda: next(
                (i for i in gce.live() if i.body["labels"].get("partition") == partition), None
            ),
            90,
            f"the VM of {partition}",
        )
        gce.wait_for(lambda: len(_steps(progress)) >= 3, 90, "training under way")
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == -signal.SIGKILL
    assert len(_steps(progress)) < int(cfg["ops"]["fanout_work"]["config"]["steps"])
    return inst


def _self_deleted(gce, name: str) -> bool:
    path = f"/compute/v1/projects/lab-test-project/zones/us-central1-a/instances/{name}"
    auths = [a for m, p, a in gce.authorized if m == "DELETE" and p == path]
    return bool(auths) and all(a and a.startswith("Bearer ") for a in auths)


def _materialized(result) -> list:
    return [e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]


def test_a_killed_orchestrators_step_finishes_commits_and_a_rerun_uses_it(
    gce, gce_instance, gcs_emulator, tmp_path
):
    progress = tmp_path / "p10.progress"
    steps = 25
    cfg = run_config(
        idle_minutes=0.05,
        lease_ttl_s=3,
        launcher={"boot_disk_gb": 110},  # a shape of its own: no other test's idle VM
        mode="train",
        steps=steps,
        step_s=0.2,
        checkpoint_every=5,
        progress_file=str(progress),
    )
    inst = _start_and_kill(gce, gce_instance, "p10", cfg, progress)
    # Nobody is listening: the step trains to its end, commits, and the VM deletes itself.
    gce.wait_for(lambda: gce.find(inst.name) is None, 90, "the VM to delete itself")
    assert _steps(progress) == list(range(1, steps + 1))
    assert _self_deleted(gce, inst.name)
    manifests = list(storage_root(gcs_emulator).glob("gce/fanout_work/*p10*/manifest.json"))
    assert manifests, "the step's output was not committed"
    before = len(gce.inserted)
    with run_fanout(gce_instance, "p10", cfg) as result:
        assert result.success
        msgs = messages(gce_instance, result.run_id)
        assert _materialized(result)  # the earlier launch's materialisation, in this run
    assert len(gce.inserted) == before  # no VM
    assert _steps(progress) == list(range(1, steps + 1))  # nothing redone
    assert any("finished already in launch" in m and "using its outputs" in m for m in msgs)


def test_a_rerun_while_the_step_runs_reattaches_and_relays_the_rest(gce, gce_instance, tmp_path):
    progress = tmp_path / "p11.progress"
    steps = 60
    cfg = run_config(
        idle_minutes=0.05,
        lease_ttl_s=3,
        launcher={"boot_disk_gb": 111},
        mode="train",
        steps=steps,
        step_s=0.2,
        checkpoint_every=10,
        progress_file=str(progress),
    )
    inst = _start_and_kill(gce, gce_instance, "p11", cfg, progress)
    before = len(gce.inserted)
    with run_fanout(gce_instance, "p11", cfg) as result:
        assert result.success
        msgs = messages(gce_instance, result.run_id)
        assert _materialized(result)
    assert len(gce.inserted) == before  # re-attached: no second VM
    assert any("re-attaching to its event stream" in m and inst.name in m for m in msgs)
    # The rest of the step's events arrived in the new run, the last step among them,
    # and every step ran exactly once.
    assert any(m.startswith(f"trained step {steps} (attempt 1)") for m in msgs)
    assert _steps(progress) == list(range(1, steps + 1))
    gce.wait_for(lambda: gce.find(inst.name) is None, 60, "the idle VM to delete itself")


def test_a_step_preempted_while_nobody_watched_resumes_from_its_checkpoint_on_rerun(
    gce, gce_instance, tmp_path
):
    """Orchestrator killed, then the spot VM preempted: the step checkpoints and stops with
    nobody listening; the re-run takes the launch over and resumes it on one new VM."""
    progress = tmp_path / "p12.progress"
    steps, every = 40, 5
    cfg = run_config(
        idle_minutes=0.05,
        lease_ttl_s=3,
        launcher={"boot_disk_gb": 112},
        mode="train",
        steps=steps,
        step_s=0.2,
        checkpoint_every=every,
        progress_file=str(progress),
    )
    inst = _start_and_kill(gce, gce_instance, "p12", cfg, progress)
    gce.wait_for(lambda: len(_steps(progress)) >= 8, 60, "a checkpoint's worth of steps")
    gce.preempt(inst.name, grace_s=5.0, wait=True)
    done_before = _steps(progress)
    assert done_before and done_before[-1] < steps
    before = len(gce.inserted)
    with run_fanout(gce_instance, "p12", cfg) as result:
        assert result.success
        msgs = messages(gce_instance, result.run_id)
    assert len(gce.inserted) == before + 1  # one VM for the rest, none beside it
    assert any("left unfinished" in m and "resuming it from its checkpoints" in m for m in msgs)
    done = _steps(progress)
    assert sorted(set(done)) == list(range(1, steps + 1))
    assert len(done) - steps <= every  # at most one checkpoint interval redone
