"""The VM's boot path against the fake, the way GCE runs it: the real startup script
bootstrapping the fallback image through strict shims, the agent as a systemd unit of
its own, a failing bootstrap reported within a poll, the serial console's tail when no
agent status arrives, and a preemption delivered as GCE delivers it (metadata flip,
shutdown script, ACPI shutdown, power off) ending in an emergency checkpoint."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from lab_assets_tests.fakes import vm_shims
from lab_assets_tests.fakes.fake_compute import REPO_ROOT
from lab_assets_tests.fakes.fake_machine import Machine
from lab_assets_tests.gce_fixtures import (
    BUCKET,
    messages,
    preempt_first_vm_after_checkpoint,
    run_gce_job,
    trained_steps,
)
from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.gcs import Gcs
from resources.remote import protocol, vm_boot

pytest_plugins = ["lab_assets_tests.gce_fixtures"]

L4 = [{"acceleratorType": "zones/us-central1-a/acceleratorTypes/nvidia-l4", "acceleratorCount": 1}]


# -- the scripts alone, on a fake machine (no Compute API) ---------------------------------------


def _items(instr: dict | None = None) -> dict[str, str]:
    return {**vmbody.vm_module_sources(), protocol.INSTRUCTIONS_KEY: json.dumps(instr or {})}


def test_the_fallback_bootstrap_runs_through_strict_shims_and_starts_the_agent_unit(
    gcs_emulator, tmp_path
):
    """The Deep Learning VM branch: no venv, so driver, uv, Python 3.11, the venv, torch's
    CUDA build and the agent's dependency, each reported to GCS; then the agent's unit."""
    launch = f"gs://{BUCKET}/boot-test/{time.time_ns()}"
    m = Machine(tmp_path / "vm", _items({"launch_uri": launch, "attempt": 3}), gpus=L4)
    try:
        res = m.run(vmbody.startup_script(str(m.lab_home)))
        assert res.returncode == 0, res.stdout + res.stderr
        boot = Gcs().read_json(f"{launch}/attempts/3/{protocol.BOOT_FILE}")
        phases = [(p["name"], p["state"]) for p in boot["phases"]]
        assert phases == [
            ("driver", "done"),
            ("uv", "done"),
            ("python", "done"),
            ("venv", "done"),
            ("torch", "done"),
            ("agent-deps", "done"),
            ("agent", "done"),
        ]
        assert boot["vm"] == "vm" and "failed" not in boot
        assert "NVIDIA driver 570" in boot["phases"][0]["detail"]
        # the agent's unit, as systemd would run it: its own process, outside the script
        unit = m.systemd.units[protocol.AGENT_UNIT]
        assert unit.argv[:3] == [f"{m.lab_home}/venv/bin/python", "-u", "-c"]
        assert unit.argv[3] == vm_boot.AGENT_BOOT and unit.argv[4] == f"{m.lab_home}/agent"
        assert (unit.kill_mode, unit.timeout_stop_s, unit.cwd) == ("mixed", 25, str(m.lab_home))
        assert unit.env[protocol.HOME_ENV] == f"{m.lab_home}/run"
        assert unit.stops_after_the_shutdown_script
        # the agent itself ran (here it finds no `launch_uri` bundle: it fails, and says so)
        unit.proc.wait(timeout=60)
        run = m.lab_home / "run"
        assert (run / protocol.AGENT_PID_FILE).read_text().strip() == str(unit.proc.pid)
        assert (run / protocol.AGENT_EXITED_FILE).is_file()
        assert "[agent] pid" in (run / protocol.AGENT_LOG_FILE).read_text()
        assert (m.lab_home / "venv").is_symlink()  # `uv venv` linked the test venv
        assert not (m.lab_home / ".bootstrap-incomplete").exists()
        # a second boot (a reboot) of the same disk finds the venv: no bootstrap
        res = m.run(vmbody.startup_script(str(m.lab_home)))
        assert res.returncode == 0, res.stderr
        boot = Gcs().read_json(f"{launch}/attempts/3/{protocol.BOOT_FILE}")
        assert [(p["name"], p["state"]) for p in boot["phases"]] == [
            ("prebaked", "skipped"),
            ("agent", "done"),
        ]
    finally:
        m.close()


def test_a_failing_phase_is_reported_with_its_tail_and_stops_the_boot(gcs_emulator, tmp_path):
    launch = f"gs://{BUCKET}/boot-test/{time.time_ns()}"
    fail = {"uv python install": "error: Failed to download cpython-3.11: connection reset"}
    m = Machine(tmp_path / "vm", _items({"launch_uri": launch}), LAB_FAKE_FAIL=json.dumps(fail))
    try:
        res = m.run(vmbody.startup_script(str(m.lab_home)))
        assert res.returncode == 1, res.stdout + res.stderr
        boot = Gcs().read_json(f"{launch}/attempts/1/{protocol.BOOT_FILE}")
        assert boot["state"] == "failed"
        assert boot["failed"]["phase"] == "python" and boot["failed"]["detail"] == "exit 2"
        assert "connection reset" in boot["failed"]["tail"]
        assert [(p["name"], p["state"]) for p in boot["phases"]][-2:] == [
            ("uv", "done"),
            ("python", "failed"),
        ]
        assert not m.systemd.units  # no agent
        assert (m.lab_home / ".bootstrap-incomplete").exists()  # the next boot starts over
    finally:
        m.close()


def test_an_image_build_whose_bootstrap_fails_gets_its_report_at_once(gcs_emulator, tmp_path):
    """The image manager waits for the image-build agent's report: a failed bootstrap
    writes it instead (ok: false), so the build ends now, not at its timeout."""
    report = f"gs://{BUCKET}/boot-test/{time.time_ns()}/health.json"
    fail = {"nvidia-smi": "NVIDIA-SMI has failed because it couldn't communicate with the driver"}
    instr = {"mode": "image-build", "report_uri": report}
    m = Machine(tmp_path / "vm", _items(instr), gpus=L4, LAB_FAKE_FAIL=json.dumps(fail))
    try:
        script = vmbody.startup_script(str(m.lab_home)).replace(
            f"SECONDS + {vmbody.DRIVER_WAIT_S}", "SECONDS + 1"
        )
        assert m.run(script).returncode == 1
        got = Gcs().read_json(report)
        assert got["ok"] is False
        assert got["error"].startswith("bootstrap failed: driver: ")
        assert "no NVIDIA driver after" in got["error"]
    finally:
        m.close()


def test_the_startup_script_never_needs_apt_and_the_shims_refuse_what_the_tools_would(tmp_path):
    code = [ln for ln in vmbody.startup_script().splitlines() if not ln.lstrip().startswith("#")]
    assert not re.search(r"\b(apt-get|apt|dpkg|fuser)\b", "\n".join(code))
    assert "--system-site-packages" not in vmbody.startup_script()
    shims = vm_shims.install(tmp_path / "shims")
    env = {
        **os.environ,
        "PATH": f"{shims}:{os.environ['PATH']}",
        "UV_PYTHON_INSTALL_DIR": str(tmp_path),
    }

    def sh(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)

    assert sh("apt-get install -y python3.11").returncode == 100
    assert "unexpected argument '--frobnicate'" in sh("uv pip install --frobnicate x").stderr
    # torch's CUDA build is not on PyPI
    res = sh(f"uv pip install --python {sys.executable} torch==2.13.0+cu128")
    assert res.returncode == 2 and "not on PyPI" in res.stderr
    res = sh(f"uv pip install --python {sys.executable} --index-url {vmbody.TORCH_INDEX} torch")
    assert res.returncode == 2
    assert sh("nvidia-smi -L").returncode == 9  # no GPU on this machine
    assert sh("curl -fsS https://pypi.org/simple/").returncode == 6  # no other host
    assert sh("systemctl enable --now lab-agent").returncode == 1
    res = sh(f"UV_PYTHON_PREFERENCE=only-managed uv venv --python 3.11 {tmp_path / 'x'}")
    assert "No interpreter found for Python 3.11" in res.stderr and res.returncode == 2


def test_the_unit_file_survives_any_lab_home_and_parses_as_systemd_reads_it():
    home = '/opt/lab $HOME %h "quoted" back\\slash'
    spec = vm_shims.parse_unit(vm_boot.unit(home), protocol.AGENT_UNIT)
    assert spec["argv"] == [
        f"{home}/venv/bin/python",
        "-u",
        "-c",
        vm_boot.AGENT_BOOT,
        f"{home}/agent",
    ]
    assert spec["env"] == {
        protocol.HOME_ENV: f"{home}/run",
        "LAB_HOME": home,
        "PYTHONUNBUFFERED": "1",
    }
    assert spec["cwd"] == home
    assert (spec["kill_mode"], spec["timeout_stop_s"], spec["restart"]) == ("mixed", 25, "no")
    assert spec["stdout"] == "journal+console"  # never a pipe someone else holds
    with pytest.raises(ValueError, match="newline"):
        vm_boot.unit("/opt/lab\nExecStartPre=/bin/evil")
    with pytest.raises(ValueError, match="unknown key"):
        vm_shims.parse_unit(vm_boot.unit("/opt/lab").replace("KillMode", "KilMode"), "x.service")


def test_the_boot_helper_runs_on_the_images_python_3_10_and_the_torch_pin_matches(tmp_path):
    for mod in ("vm_boot", "protocol", "agent_unit"):
        src = (REPO_ROOT / "resources" / "remote" / f"{mod}.py").read_text()
        ast.parse(src, feature_version=(3, 10))  # no syntax newer than the image's Python
    pins = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={vmbody.TORCH_VERSION}" in pins
    script = vmbody.startup_script()
    assert f"torch=={vmbody.TORCH_VERSION}+cu128" in script
    assert "https://download.pytorch.org/whl/cu128" in script
    assert f"https://astral.sh/uv/{vmbody.UV_VERSION}/install.sh" in script


def test_the_shutdown_script_asks_the_agent_to_checkpoint_and_waits_boundedly(tmp_path):
    """The agent (a stub here) gets SIGTERM; the script returns once it says all is durable,
    or, for an agent that never does, after its bounded wait."""
    m = Machine(tmp_path / "vm", {})
    run = m.lab_home / "run"
    run.mkdir(parents=True)
    stub = (
        "import os, signal, sys, time\n"
        "run = sys.argv[1]; slow = sys.argv[2] == 'slow'\n"
        "open(f'{run}/agent.pid', 'w').write(str(os.getpid()))\n"
        "def term(*_):\n"
        "    open(f'{run}/got-sigterm', 'w').write('1')\n"
        "    if not slow:\n"
        "        time.sleep(0.5); open(f'{run}/agent.exited', 'w').write('0'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "open(f'{run}/ready', 'w').write('1')\n"
        "while True: time.sleep(0.05)\n"
    )
    try:
        for mode in ("quick", "slow"):
            for f in run.iterdir():
                f.unlink()
            agent = subprocess.Popen([sys.executable, "-c", stub, str(run), mode])
            deadline = time.monotonic() + 30
            while not (run / "ready").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            # the quick agent answers in 0.5 s: a generous bound so a loaded machine cannot
            # fail it; the slow one never answers, so its bound is what ends the wait
            res = m.run(
                vmbody.shutdown_script(str(m.lab_home), wait_s=20 if mode == "quick" else 1)
            )
            assert res.returncode == 0, res.stderr
            assert (run / "got-sigterm").exists()
            assert f"asked the lab agent (pid {agent.pid}) to checkpoint and stop" in res.stdout
            if mode == "quick":
                assert "the lab agent stopped (0)" in res.stdout
                assert agent.wait(timeout=10) == 0
            else:
                assert "still running after 1s" in res.stdout
                agent.kill()
                agent.wait()
        # no agent (a VM deleted before its boot got that far): nothing to do
        for f in run.iterdir():
            f.unlink()
        assert "no lab agent" in m.run(vmbody.shutdown_script(str(m.lab_home))).stdout
    finally:
        m.close()


# -- through the launcher, against the fake Compute Engine ----------------------------------------


def _failure_text(result) -> str:
    return next(
        e for e in result.all_events if e.is_step_failure
    ).step_failure_data.error.to_string()


def _vms(gce, run_id: str) -> list[dict]:
    return [b for b in gce.inserted if b["labels"].get("run") == run_id]


@pytest.fixture
def booted(gce):
    """Every instance the fake boots during the test (they stay inspectable once deleted)."""
    seen: list = []
    gce.on_boot.append(seen.append)
    yield seen
    gce.on_boot.remove(seen.append)


def test_a_step_on_the_fallback_image_bootstraps_and_runs_its_agent_as_a_unit(
    gce, gce_instance, booted
):
    with run_gce_job(gce_instance, mode="ok") as result:
        assert result.success, _failure_text(result)
        msgs = messages(gce_instance, result.run_id)
    (body,) = _vms(gce, result.run_id)
    assert vmbody.DLVM_FAMILY in body["disks"][0]["initializeParams"]["sourceImage"]
    items = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    assert items["shutdown-script"] == vmbody.shutdown_script()
    # each phase arrived in the run's log as it happened
    for phase in ("driver", "uv", "python", "venv", "torch", "agent-deps", "agent"):
        assert any(f"boot: {phase} done" in m for m in msgs), phase
    (inst,) = [i for i in booted if i.name == body["name"]]
    # the startup script ended after starting the agent; the agent ran as the unit
    assert inst.proc.returncode == 0
    unit = inst.systemd.units[protocol.AGENT_UNIT]
    run = Path(unit.env[protocol.HOME_ENV])
    assert (run / protocol.AGENT_PID_FILE).read_text().strip() == str(unit.proc.pid)
    assert "step worker exited with code 0" in (run / protocol.AGENT_LOG_FILE).read_text()
    console = gce.serial_output(body["name"])
    assert "startup-script: torch:" in console and "[agent] attempt 1 on" in console


def test_a_failing_bootstrap_fails_the_step_at_once_with_its_phase_and_tail(gce, gce_instance):
    """With a 10-minute boot timeout, the failure still arrives from the boot report: the
    message is the bootstrap's, not the timeout's."""
    gce.fail_boot("uv python install", "error: Failed to download cpython-3.11.14: reset by peer")
    cfg = {"resources": {"step_launcher": {"config": {"boot_timeout_s": 600}}}}
    with run_gce_job(gce_instance, run_config=cfg, mode="ok") as result:
        assert not result.success
        text = _failure_text(result)
        msgs = messages(gce_instance, result.run_id)
    assert "bootstrap failed: python: " in text
    assert "error: Failed to download cpython-3.11.14: reset by peer" in text
    assert "never reported" not in text
    assert any("boot: uv done" in m for m in msgs)
    (body,) = _vms(gce, result.run_id)
    assert gce.find(body["name"]) is None  # deleted


def test_without_any_agent_status_the_error_shows_the_serial_console_tail(gce, gce_instance):
    """A VM that cannot reach GCS (no storage permission, no route) never reports: after the
    boot timeout the step fails with what its console said last."""
    gce.vm_env["STORAGE_EMULATOR_HOST"] = "http://127.0.0.1:9"
    cfg = {"resources": {"step_launcher": {"config": {"boot_timeout_s": 15}}}}
    with run_gce_job(gce_instance, run_config=cfg, mode="ok") as result:
        assert not result.success
        text = _failure_text(result)
    assert "the agent never reported in 15s" in text
    assert "its serial console ends:" in text
    tail = text.split("its serial console ends:", 1)[1]
    assert "vm_boot: could not report" in tail or "[agent]" in tail, tail
    assert "Connection refused" in tail or "connection refused" in tail.lower(), tail


def test_serial_port_output_reads_the_consoles_tail(gce):
    from resources.compute.gce.api import ComputeApi

    api = ComputeApi("lab-test-project")
    name = f"lab-serial-{time.time_ns() % 10**8}"
    spec = vmbody.VmSpec(
        project="lab-test-project",
        zone="us-central1-a",
        name=name,
        machine_type="g2-standard-4",
        source_image=f"projects/{vmbody.DLVM_PROJECT}/global/images/family/{vmbody.DLVM_FAMILY}",
        gpu_type="nvidia-l4",
        gpu_count=1,
        instructions={"mode": "none"},  # the agent refuses it and exits
        labels=vmbody.labels(experiment="boot-test", run="serial", partition="none"),
    )
    api.insert_instance("us-central1-a", vmbody.build_instance(spec))
    try:
        gce.wait_for(lambda: "unknown mode" in gce.serial_output(name), 60, "the agent's exit")
        full = api.serial_port_output("us-central1-a", name)
        tail = api.serial_port_output("us-central1-a", name, start=-100)
        assert "startup-script: agent:" in full and "[agent] unknown mode 'none'" in full
        assert full.endswith(tail) and len(tail) == 100
        assert api.serial_port_output("us-central1-a", name, start=len(full)) == ""
    finally:
        api.delete_instance("us-central1-a", name)


def test_a_preemption_delivered_as_gce_does_ends_in_an_emergency_checkpoint(
    gce, gce_instance, booted
):
    """Flip, shutdown script (it asks the agent to checkpoint and waits), ACPI shutdown,
    power off: the step checkpoints at the step it was on, and the new VM resumes there."""
    steps, every = 30, 5
    t, preempted = preempt_first_vm_after_checkpoint(gce, 10, grace_s=10.0, timeout_s=90)
    with run_gce_job(
        gce_instance, mode="train", steps=steps, step_s=0.1, checkpoint_every=every
    ) as result:
        assert result.success, _failure_text(result)
        msgs = messages(gce_instance, result.run_id)
    t.join(timeout=5)
    (inst,) = preempted
    ev = inst.shutdown_events
    order = [
        "preempted: instance/preempted is TRUE",
        "shutdown-script started",
        "shutdown-script exited 0",
        "power off",
    ]
    assert [e for e in ev if e in order] == order, ev
    console = gce.serial_output(inst.name)
    assert re.search(r"shutdown-script: the lab agent (has already )?stopped", console), console
    run = Path(inst.systemd.units[protocol.AGENT_UNIT].env[protocol.HOME_ENV])
    assert (run / protocol.AGENT_EXITED_FILE).read_text().strip() == "0"
    trained = trained_steps(msgs)
    first = [s for s, a in trained if a == 1]
    second = [s for s, a in trained if a == 2]
    assert first and second and second[-1] == steps
    resumed_from = second[0] - 1
    # the emergency checkpoint: the step it was on when the notice came, not the last periodic
    assert resumed_from == max(first), (first, second)
    assert any(f"resuming from checkpoint-{resumed_from}" in m for m in msgs)
    assert len(trained) - steps <= every  # lost at most one checkpoint interval (here none)
    assert any("was preempted (1/2)" in m for m in msgs)
