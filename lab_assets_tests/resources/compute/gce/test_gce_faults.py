"""The Compute API misbehaving, against the stricter fake: transient errors retried, an
insert whose wait fails not leaking its VM, bodies GCE refuses refused, a dotted experiment
name found and reaped, and one actionable line without credentials."""

from __future__ import annotations

import time

import pytest

from lab_assets.cli.gce import gce_main
from lab_assets_tests.gce_fixtures import messages, run_gce_job
from lab_assets_tests.resources.compute.gce.test_gce_body import GCE_EXPERIMENT
from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.api import RETRY_ENV, ComputeApi
from resources.compute.gce.errors import CapacityError, GceApiError
from resources.compute.gce.reaper import judge, list_lab_vms, reap

pytest_plugins = ["lab_assets_tests.gce_fixtures"]

PROJECT = "lab-test-project"
DLVM = f"projects/{vmbody.DLVM_PROJECT}/global/images/family/{vmbody.DLVM_FAMILY}"


def _body(name: str, zone: str = "us-central1-a", **kw):
    spec = dict(
        project=PROJECT,
        zone=zone,
        name=name,
        machine_type="g2-standard-4",
        source_image=DLVM,
        gpu_type="nvidia-l4",
        gpu_count=1,
        labels=vmbody.labels(experiment="faults", run="r1", partition="p"),
    )
    return vmbody.build_instance(vmbody.VmSpec(**{**spec, **kw}))


@pytest.fixture
def quiet(gce, monkeypatch):
    """The fake without booting agents, and API retries paced for a test (≤ 2 s a call)."""
    monkeypatch.setenv(RETRY_ENV, "2")
    gce.boot = False
    yield gce
    gce.boot = True
    for inst in gce.live():
        if inst.body["labels"].get("experiment") in ("faults", "qwen2_5-3b-lora", "other"):
            ComputeApi(PROJECT).delete_instance(inst.zone, inst.name, wait=False)


def test_transient_errors_are_retried_and_capacity_is_not(quiet):
    gce = quiet
    api = ComputeApi(PROJECT)
    gce.fail_next("instances.insert", 2, status=503)
    gce.fail_next("zoneOperations.wait", 1, status=429)  # rateLimitExceeded
    api.insert_instance("us-central1-a", _body("lab-faults-a1"))
    assert gce.find("lab-faults-a1") is not None
    gce.fail_next("instances.get", 2, status=500)
    assert api.get_instance("us-central1-a", "lab-faults-a1").name == "lab-faults-a1"
    gce.fail_next("instances.aggregatedList", 1, status=403, reason="rateLimitExceeded")
    assert [i.name for _, i in api.list_instances({"experiment": "faults"})] == ["lab-faults-a1"]
    # the insert went through but its answer was lost: the retry meets 409, which counts
    gce.fail_next("instances.insert", 1, status=502, after=True)
    api.insert_instance("us-central1-b", _body("lab-faults-a2", zone="us-central1-b"))
    assert len([b for b in gce.inserted if b["name"] == "lab-faults-a2"]) == 1
    gce.fail_next("instances.delete", 1, status=503)
    assert api.delete_instance("us-central1-b", "lab-faults-a2")
    assert gce.find("lab-faults-a2") is None
    assert api.retries == 2 + 1 + 2 + 1 + 1 + 1
    assert gce.faults.injected.count("instances.insert") == 3
    # a stockout (even a 503) is not retried here: the zone failover moves on
    retries = api.retries
    gce.stockout("us-central1-c", via="http")
    with pytest.raises(CapacityError):
        api.insert_instance("us-central1-c", _body("lab-faults-a3", zone="us-central1-c"))
    assert api.retries == retries
    # a blip that outlasts the retry budget is an error naming the call
    gce.fail_next("instances.get", 1000, status=503)
    t0 = time.monotonic()
    with pytest.raises(GceApiError, match="instances.get lab-faults-a1") as e:
        api.get_instance("us-central1-a", "lab-faults-a1")
    assert e.value.code == "backendError" and time.monotonic() - t0 < 10


def test_bodies_gce_refuses_are_400s(quiet):
    api = ComputeApi(PROJECT)
    cases = {
        "Unknown zone": dict(zone="us-central1-q"),
        "Machine type with name 'g2-standard-5'": dict(machine_type="g2-standard-5"),
        "Accelerator type 'nvidia-l5'": dict(gpu_type="nvidia-l5"),
        "comes with 2 nvidia-l4": dict(machine_type="g2-standard-24", gpu_count=1),
        "comes with 1 nvidia-tesla-a100": dict(machine_type="a2-highgpu-1g"),
        "image resource cannot be found": dict(source_image="projects/p/global/images/family/f"),
        "does not support accelerators": dict(machine_type="e2-standard-4"),
        "network resource cannot be found": dict(network="global/networks/lab-vpc"),
        "subnetwork resource cannot be found": dict(subnetwork="regions/us-central1/subnetworks/x"),
    }
    for i, (message, kw) in enumerate(cases.items()):
        zone = kw.get("zone", "us-central1-a")
        with pytest.raises(GceApiError, match=message) as e:
            api.insert_instance(zone, _body(f"lab-faults-bad{i}", **kw))
        assert e.value.code == "invalid" and not e.value.accepted
    assert not [i for i in quiet.live() if i.name.startswith("lab-faults-bad")]
    # the machine type's own count is accepted: 2 L4s on a g2-standard-24
    api.insert_instance(
        "us-central1-a", _body("lab-faults-g24", machine_type="g2-standard-24", gpu_count=2)
    )
    body = quiet.find("lab-faults-g24").body
    assert body["guestAccelerators"][0]["acceleratorCount"] == 2
    # a network the project has, without an external IP
    quiet.networks.add("lab-vpc")
    quiet.subnetworks.add("lab-us-central1")
    try:
        api.insert_instance(
            "us-central1-a",
            _body(
                "lab-faults-vpc",
                network="global/networks/lab-vpc",
                subnetwork="regions/us-central1/subnetworks/lab-us-central1",
                external_ip=False,
            ),
        )
    finally:
        quiet.networks.discard("lab-vpc")
        quiet.subnetworks.discard("lab-us-central1")
    (nic,) = quiet.find("lab-faults-vpc").body["networkInterfaces"]
    assert nic["subnetwork"].endswith("/lab-us-central1") and "accessConfigs" not in nic


def test_an_insert_whose_wait_fails_is_recorded_and_its_vm_deleted(quiet, gce_instance):
    gce = quiet
    before = len(gce.inserted)
    gce.fail_next("zoneOperations.wait", 10_000, status=503)  # every wait, past the retries
    with run_gce_job(gce_instance, mode="ok") as result:
        assert not result.success
        msgs = messages(gce_instance, result.run_id)
    (body,) = gce.inserted[before:]  # GCE accepted the insert: the VM existed
    name = body["name"]
    assert any(f"VM {name} in us-central1-a: insert accepted but not confirmed" in m for m in msgs)
    gce.wait_for(lambda: gce.find(name) is None, 10, "the unconfirmed VM to be deleted")
    assert name in [d["name"] for d in gce.deleted]


def test_a_dotted_experiment_name_is_listed_and_reaped(
    quiet, gce_instance, monkeypatch, capsys, tmp_path
):
    gce = quiet
    api = ComputeApi(PROJECT)
    exp = "qwen2.5-3b-lora"
    for i, e in enumerate([exp, exp, "other"]):
        labels = vmbody.labels(experiment=e, run=f"run{i}", partition="p")
        api.insert_instance("us-central1-a", _body(f"lab-dotted-a{i}", labels=labels))
    assert gce.find("lab-dotted-a0").body["labels"]["experiment"] == "qwen2_5-3b-lora"
    vms = list_lab_vms(api, exp)
    assert sorted(v.name for v in vms) == ["lab-dotted-a0", "lab-dotted-a1"]
    # `lab vms list` / `reap` of an experiment file with that name find them too
    f = tmp_path / "dotted.yaml"
    f.write_text(GCE_EXPERIMENT.read_text().replace("name: small-gce", f"name: {exp}"))
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(gce_instance.root_directory))
    assert gce_main(["vms", "list", "--experiment", str(f)]) == 0
    out = capsys.readouterr().out
    assert "lab-dotted-a0" in out and "lab-dotted-a1" in out and "lab-dotted-a2" not in out
    assert f"2 lab VM(s) of {exp}" in out
    done = reap(api, [judge(v, lambda _r: "SUCCESS", 0) for v in vms])  # all past the limit
    assert len(done) == 2
    gce.wait_for(
        lambda: gce.find("lab-dotted-a0") is None and gce.find("lab-dotted-a1") is None,
        10,
        "the dotted experiment's VMs to be reaped",
    )
    assert gce.find("lab-dotted-a2") is not None


def test_without_credentials_commands_print_one_actionable_line(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("LAB_GCE_API_ENDPOINT", raising=False)
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    for argv in (["vms", "list"], ["image", "teardown"]):
        assert gce_main([*argv, "--experiment", str(GCE_EXPERIMENT)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith("lab: no Google Cloud credentials")
        assert "gcloud auth application-default login" in err
