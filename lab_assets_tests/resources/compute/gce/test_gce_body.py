"""The VM body, placement and prices, without booting anything: fast, no emulators.

Shows `lab launch --dry-run` prints the plan (zones, machine types, GPUs, $/h, worst
case vs budget) and writes the exact insert body (camelCase) on request, without
touching Compute Engine or GCS; the dead-man switch fields; spot vs on-demand
scheduling; values full of shell metacharacters staying inert when the generated
startup script really runs under bash; label sanitising; the zone / machine-type
candidates and their overrides; prices and the budget refusal's numbers.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import stat

import pytest

from lab_assets.cli.gce import gce_main
from lab_assets.experiment.load import load_experiment
from lab_assets_tests.conftest import TESTS_DIR
from lab_assets_tests.fakes.fake_machine import Machine
from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.costs import BudgetExceeded, PriceMissing, check_budget, hourly_price
from resources.compute.gce.placement import Overrides, candidates
from resources.compute.gce.settings import LaunchSettings
from resources.compute.gce.step_vm import build_vm_spec
from resources.remote import launch_info, preemption, protocol, vm_boot

GCE_EXPERIMENT = TESTS_DIR / "experiments" / "gce.yaml"
NASTY = "x$(touch {c})`touch {c}`;touch {c};' ; touch {c} ; '\"; touch {c}; \"|&>{c}\n{c}"


def _settings(**kw) -> LaunchSettings:
    base = dict(
        project="lab-test-project",
        zones=("us-central1-a", "us-central1-b", "us-central1-c"),
        machine_type="g2-standard-4",
        gpu_type="nvidia-l4",
        storage_root="gs://bucket/root",
        experiment="exp",
        gpu_zones={
            "nvidia-l4": {
                "us-central1-b": ["g2-standard-8", "g2-standard-4"],
                "us-central1-c": ["g2-standard-8"],
            }
        },
        hourly_usd={"g2-standard-4": 0.7, "g2-standard-4:spot": 0.28, "nvidia-l4": 0.0},
    )
    return LaunchSettings(**{**base, **kw})


def _spec(s: LaunchSettings, partition: str = "m|r", **kw):
    p = s.placements()[0]
    args = dict(
        placement=p,
        name="lab-exp-run-abc123-a1",
        source_image="projects/p/global/images/family/f",
        prebaked=True,
        launch_uri="gs://bucket/root/exp/_launches/run/adapter",
        attempt=1,
        run_id="0b6f3a4e-1111-2222-3333-444455556666",
        step_key="adapter",
        partition=partition,
        launch_info={"zone": p.zone},
    )
    return build_vm_spec(s, **{**args, **kw})


def test_dry_run_prints_the_plan_and_writes_the_insert_body_without_touching_anything(
    capsys, monkeypatch, tmp_path
):
    # Endpoints that refuse connections: any API or GCS call would fail the command.
    monkeypatch.setenv("LAB_GCE_API_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    key = "tiny-test|sft-arith-r4-s0"
    out_file = tmp_path / "body.json"
    rc = gce_main(
        ["launch", "--dry-run", "--asset", "adapter", "--partition", key]
        + ["--experiment", str(GCE_EXPERIMENT), "--body-out", str(out_file)]
    )
    assert rc == 0
    table = capsys.readouterr().out
    # zone a, then zone b's two types, the configured one first; the file's hourly_usd
    # overrides the catalog (g2-standard-8 has only an on-demand override: it is used for spot)
    rows = [ln.split() for ln in table.splitlines() if re.match(r"\s+\d+\s+us-", ln)]
    assert [(r[1], r[2], r[3], r[5]) for r in rows] == [
        ("us-central1-a", "g2-standard-4", "1", "nvidia-l4"),
        ("us-central1-b", "g2-standard-4", "1", "nvidia-l4"),
        ("us-central1-b", "g2-standard-8", "1", "nvidia-l4"),
    ]
    assert [float(r[6]) for r in rows] == [0.28, 0.28, 0.85]
    assert [float(r[7]) for r in rows] == [0.56, 0.56, 1.70]  # x 2 h maxRunDuration
    assert "budget $25.00: the first choice's worst case $0.56 fits" in table
    assert "skypilot-catalog" in table and "--body-out" in table
    body = json.loads(out_file.read_text())
    assert body["machineType"] == "zones/us-central1-a/machineTypes/g2-standard-4"
    assert body["guestAccelerators"] == [
        {"acceleratorType": "zones/us-central1-a/acceleratorTypes/nvidia-l4", "acceleratorCount": 1}
    ]
    sched = body["scheduling"]
    assert sched["maxRunDuration"] == {"seconds": "7200"}  # the dead-man switch
    assert sched["instanceTerminationAction"] == "DELETE"
    assert sched["provisioningModel"] == "SPOT"
    assert body["labels"]["experiment"] == "small-gce"
    assert body["labels"]["partition"] == "tiny-test_sft-arith-r4-s0"
    items = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    assert set(items) == {"startup-script", "shutdown-script", "lab-launch", *protocol.VM_MODULES}
    instr = json.loads(items["lab-launch"])
    assert instr["partition"] == key and instr["mode"] == "step"
    assert instr["launch_uri"].startswith("gs://lab-test-bucket/experiments/small-gce/_launches/")
    assert key not in items["startup-script"]
    # snake_case never leaks into the REST body
    assert not re.search(r'"[a-z]+_[a-z_]+":', json.dumps(body))


def test_dry_run_overrides_from_flags_and_env(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    monkeypatch.setenv("LAB_GCE_MACHINE_TYPE", "g2-standard-8")
    out_file = tmp_path / "body.json"
    rc = gce_main(
        ["launch", "--dry-run", "--asset", "adapter", "--partition", "tiny-test|sft-arith-r4-s0"]
        + ["--zone", "us-central1-b", "--experiment", str(GCE_EXPERIMENT)]
        + ["--body-out", str(out_file)]
    )
    assert rc == 0
    body = json.loads(out_file.read_text())
    assert body["machineType"] == "zones/us-central1-b/machineTypes/g2-standard-8"
    assert (
        gce_main(
            ["launch", "--dry-run", "--asset", "adapter", "--partition", "nope|nope"]
            + ["--experiment", str(GCE_EXPERIMENT)]
        )
        == 2
    )


def test_on_demand_gpu_vms_terminate_on_host_maintenance_and_keep_the_dead_man_switch():
    inst = vmbody.build_instance(_spec(_settings(spot=False, max_run_duration_s=900)))
    body = json.loads(vmbody.instance_json(inst))
    sched = body["scheduling"]
    assert sched["provisioningModel"] == "STANDARD"
    assert sched["onHostMaintenance"] == "TERMINATE"
    assert sched["maxRunDuration"] == {"seconds": "900"}
    assert sched["instanceTerminationAction"] == "DELETE"


def test_shell_metacharacters_stay_inert_in_the_startup_script(tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    canary = tmp_path / "CANARY"
    nasty = NASTY.format(c=canary)
    s = _settings(env={"LAB_NOTE": nasty}, experiment="exp")
    spec = _spec(s, partition=nasty, run_id=nasty, step_key=nasty)
    inst = vmbody.build_instance(spec)
    body = json.loads(vmbody.instance_json(inst))
    items = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    script = items["startup-script"]
    assert "CANARY" not in script  # no value reaches the script text
    for v in body["labels"].values():
        assert re.fullmatch(r"[a-z0-9_-]{0,63}", v)
    # A config value that does reach the shell (the install directory) is quoted, and
    # escaped for systemd in the agent's unit.
    home = str(sandbox / f"home $(touch {canary}) `touch {canary}`; touch {canary}")
    script = vmbody.startup_script(lab_home=home)
    python = sandbox / "python-stub"
    argv_file = sandbox / "agent-argv"
    python.write_text(f'#!/bin/sh\n{{ pwd; printf "%s\\n" "$@"; }} > "{argv_file}"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    venv_bin = f"{home}/venv/bin"
    os.makedirs(venv_bin)  # the pre-baked image's venv
    os.symlink(python, f"{venv_bin}/python")
    (sandbox / "startup.sh").write_text(script)
    # GCS unreachable from this "VM": its boot reports fail (and say so) without stopping it
    with Machine(tmp_path / "vm", items, STORAGE_EMULATOR_HOST="http://127.0.0.1:9") as vm:
        # the default LAB_HOME: the quoted one in the script
        res = vm.run(f"unset LAB_HOME; cd {shlex.quote(str(sandbox))} && bash startup.sh")
        assert res.returncode == 0, res.stdout + res.stderr
        unit = vm.systemd.units[protocol.AGENT_UNIT]
        assert unit.proc.wait(timeout=30) == 0
    assert not canary.exists()
    # the script laid the agent's modules out as a package from metadata, and its unit ran
    # the agent from the quoted home with that package on sys.path only
    pkg = f"{home}/agent/resources"
    assert sorted(os.listdir(f"{pkg}/remote")) == sorted(
        ["__init__.py", *protocol.VM_MODULES.values()]
    )
    assert open(f"{pkg}/__init__.py").read() == open(f"{pkg}/remote/__init__.py").read() == ""
    for key, name in protocol.VM_MODULES.items():
        assert open(f"{pkg}/remote/{name}").read() == items[key]
    assert argv_file.read_text().split("\n")[:4] == [home, "-u", "-c", vm_boot.AGENT_BOOT]
    assert argv_file.read_text().split("\n")[4] == f"{home}/agent"
    # and the agent gets the values verbatim, as JSON data, never as shell text
    instr = json.loads(items["lab-launch"])
    assert instr["partition"] == nasty and instr["env"]["LAB_NOTE"] == nasty
    assert not canary.exists()


def test_labels_are_sanitised_and_long_values_keep_a_hash():
    long_key = "tiny-llama|" + "sft-arith-r8-s0-" * 8
    labels = vmbody.labels(partition=long_key, run="ABC|def", other=long_key + "x")
    assert labels["run"] == "abc_def"
    assert len(labels["partition"]) == 63 and labels["partition"] != labels["other"]
    assert re.fullmatch(r"[a-z][-a-z0-9]{0,61}[a-z0-9]", vmbody.vm_name("Exp_1", "R" * 40, "k", 9))


def test_candidates_follow_the_registry_and_the_overrides(monkeypatch):
    s = _settings()
    got = [(p.zone, p.machine_type) for p in s.placements()]
    # zone a has no L4 in the registry; b's configured type comes first
    assert got == [
        ("us-central1-b", "g2-standard-4"),
        ("us-central1-b", "g2-standard-8"),
        ("us-central1-c", "g2-standard-8"),
    ]
    after = [p.zone for p in s.placements(avoid=("us-central1-b",))]
    assert after == ["us-central1-c", "us-central1-b", "us-central1-b"]
    monkeypatch.setenv("LAB_GCE_ZONE", "us-central1-c")
    monkeypatch.setenv("LAB_GCE_GPU_TYPE", "nvidia-l4")
    assert [(p.zone, p.machine_type) for p in s.placements()] == [
        ("us-central1-c", "g2-standard-8")
    ]
    monkeypatch.setenv("LAB_GCE_MACHINE_TYPE", "g2-standard-16")
    assert [p.machine_type for p in s.placements()] == ["g2-standard-16"]
    # explicit (run config) beats the environment
    assert Overrides.resolve(zone="us-central1-b").zone == "us-central1-b"
    no_registry = candidates(("z-a1-a", "z-a1-b"), "n1-standard-8", "nvidia-t4", 2)
    assert [(p.zone, p.machine_type, p.gpu_count) for p in no_registry] == [
        ("z-a1-a", "n1-standard-8", 2),
        ("z-a1-b", "n1-standard-8", 2),
    ]


def test_prices_and_the_budget_refusal_numbers():
    prices = {"g2-standard-4": 0.7, "g2-standard-4:spot": 0.28, "nvidia-l4": 0.1}
    z = "us-central1-a"
    assert hourly_price(prices, "g2-standard-4", z, "nvidia-l4", 2, spot=True) == pytest.approx(
        0.48
    )
    assert hourly_price(prices, "g2-standard-4", z, "nvidia-l4", 1, spot=False) == pytest.approx(
        0.8
    )
    # without overrides, the catalog's prices for the zone: machine + count x GPU
    assert hourly_price({}, "g2-standard-8", z, "nvidia-l4", 1, spot=True) == pytest.approx(
        0.11747 + 0.2231
    )
    assert hourly_price({}, "a2-highgpu-1g", z, "nvidia-tesla-a100", 1, spot=False) == (
        pytest.approx(0.73948 + 2.93391)
    )
    with pytest.raises(PriceMissing, match="europe-west9-a"):
        hourly_price({}, "g2-standard-8", "europe-west9-a", "nvidia-l4", 1, spot=True)
    with pytest.raises(PriceMissing):
        hourly_price({}, "n1-standard-8", z, "nvidia-tesla-t4", 1, spot=True)
    check_budget(0, 1e9, 1e9, "no budget set")  # 0: no budget
    check_budget(10, 6, 4, "fits exactly")
    with pytest.raises(BudgetExceeded) as e:
        check_budget(10, 6.5, 4, "$1.000/h x 4.00 h maxRunDuration")
    assert str(e.value) == (
        "budget refused: spent $6.50 so far + this VM's worst case $4.00 "
        "($1.000/h x 4.00 h maxRunDuration) = $10.50 > budget $10.00"
    )


def test_names_shared_across_the_wire_come_from_the_protocol_module():
    """One definition of each name: the VM side and the launcher import it from protocol."""
    import ast

    from resources.remote import checkpointing, step_worker

    shared = {n for n in vars(protocol) if n.isupper()}
    modules = [preemption, launch_info, checkpointing, step_worker]
    modules += [vmbody, *(importlib.import_module(m) for m in _AGENT_MODULES)]
    for mod in modules:
        tree = ast.parse(open(mod.__file__).read())
        assigned = {
            t.id
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        assert not assigned & shared, f"{mod.__name__} redefines {assigned & shared}"
    # the agent ships every module it imports (no lab code on a fresh VM)
    shipped = {f"resources.remote.{n.removesuffix('.py')}" for n in protocol.VM_MODULES.values()}
    assert set(_AGENT_MODULES) | {"resources.remote.protocol"} == shipped


_AGENT_MODULES = [
    "resources.remote.agent",
    "resources.remote.agent_unit",
    "resources.remote.vm_boot",
    "resources.remote.agent_metadata",
    "resources.remote.agent_sync",
    "resources.remote.agent_step",
    "resources.remote.agent_image",
    "resources.remote.agent_warm",
    "resources.remote.agent_compute",
]


def test_a_gce_experiment_gets_the_gce_launcher_and_the_reaper_sensor(monkeypatch):
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    from lab_assets.definitions import build_definitions

    defs = build_definitions(load_experiment(GCE_EXPERIMENT))
    launcher = defs.resources["step_launcher"]
    assert type(launcher).__name__ == "PartialResource"
    assert launcher.resource_cls.__name__ == "GceStepLauncherResource"
    assert defs.get_sensor_def("gce_vm_reaper") is not None


def test_gce_config_checks_the_gpu_registry(tmp_path):
    from lab_assets.experiment.schema import ExperimentError

    text = GCE_EXPERIMENT.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("us-central1-b: [g2-standard-8", "us-central1-bb: [g2-standard-8"))
    with pytest.raises(ExperimentError, match=r"compute\.gce\.gpu_zones.*'us-central1-bb'"):
        load_experiment(bad)
    bad.write_text(
        text.replace("      us-central1-a: [g2-standard-4]\n", "").replace(
            "us-central1-b: [g2-standard-8, g2-standard-4]", "europe-west4-a: [g2-standard-4]"
        )
    )
    with pytest.raises(ExperimentError, match="lists no zone of `zones`"):
        load_experiment(bad)
    exp = load_experiment(GCE_EXPERIMENT)
    assert exp.file.compute.reap_after == 7200 + 600 and exp.file.compute.keep_vm is False


def test_one_settings_model_from_the_experiment_to_the_launch(monkeypatch):
    """The experiment's `compute`, the resource's config and a launch's settings share
    one model; configured at launch, the experiment's values are the defaults and a
    run's config goes on top."""
    from dagster._config import process_config

    from lab_assets.defs.resources import gce_launcher_resource, gce_settings, launcher_fields
    from lab_assets.experiment.schema import GceCompute
    from resources.compute.gce.settings import GceSettings

    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    monkeypatch.delenv("LAB_GCE_ZONE", raising=False)
    assert set(GceCompute.model_fields) == {*GceSettings.model_fields, "kind"}
    exp = load_experiment(GCE_EXPERIMENT)
    partial = gce_launcher_resource(exp)
    schema = partial.get_resource_definition().config_schema.config_type
    assert set(schema.fields) == set(LaunchSettings.model_fields)
    run = {"zone": "us-central1-b", "keep_vm": True, "budget_usd": 2.5, "bundle_install": "skip"}
    for run_config in ({}, run):
        resolved = process_config(schema, run_config)
        assert resolved.success, resolved.errors
        want = {**launcher_fields(exp), **run_config}
        assert {k: resolved.value[k] for k in want} == want
        launch = partial.resource_cls(**resolved.value).launch_settings()
        assert launch == gce_settings(exp, **run_config)
    assert {p.zone for p in gce_settings(exp, **run).placements()} == {"us-central1-b"}
