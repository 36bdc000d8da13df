"""VM housekeeping against the fake: the reaper (sensor and `lab vms`) and the image manager."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import time

from dagster import build_sensor_context
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

from lab_assets.cli.gce import gce_main, image_manager
from lab_assets.defs.sensors import build_vm_reaper_sensor
from lab_assets.experiment.load import load_experiment
from lab_assets_tests.gce_fixtures import BUCKET
from lab_assets_tests.resources.compute.gce.test_gce_body import GCE_EXPERIMENT
from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.api import ComputeApi
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.step_vm import image_for

pytest_plugins = ["lab_assets_tests.gce_fixtures"]


def _vm(api: ComputeApi, name: str, run_id: str, zone: str = "us-central1-a", **labels) -> None:
    spec = vmbody.VmSpec(
        project="lab-test-project",
        zone=zone,
        name=name,
        machine_type="g2-standard-4",
        # an image the (strict) fake knows: the Deep Learning VM family
        source_image=f"projects/{vmbody.DLVM_PROJECT}/global/images/family/{vmbody.DLVM_FAMILY}",
        gpu_type="nvidia-l4",
        gpu_count=1,
        labels=vmbody.labels(experiment="small-gce", run=run_id, partition="p", **labels),
    )
    api.insert_instance(zone, vmbody.build_instance(spec))


def test_reaper_sensor_and_cli_delete_vms_by_their_life_signs(
    gce, gce_instance, monkeypatch, capsys
):
    """Stale heartbeat or idle past its time: reaped; an agent alive and working is kept
    even though its Dagster run has ended (a killed orchestrator's run)."""
    from lab_assets.defs.resources import gce_settings
    from resources.remote.protocol import VMS_DIR

    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(gce_instance.root_directory))
    exp = load_experiment(GCE_EXPERIMENT)
    staging = gce_settings(exp).staging
    gcs = Gcs()
    now = time.time()

    def life(name: str, **rec) -> None:
        body = {"vm": name, "t": now, "deadline": now + 3600, **rec}
        gcs.write_json(f"{staging}/{VMS_DIR}/{name}.json", body)

    gce.boot = False  # these VMs need no agent: their life records are written here
    try:
        api = ComputeApi("lab-test-project")
        ended, active = (
            "11111111-aaaa-4000-8000-000000000001",
            "22222222-bbbb-4000-8000-000000000002",
        )
        gce_instance.add_run(
            DagsterRun(job_name="adapters_job", run_id=ended, status=DagsterRunStatus.SUCCESS)
        )
        gce_instance.add_run(
            DagsterRun(job_name="adapters_job", run_id=active, status=DagsterRunStatus.STARTED)
        )
        _vm(api, "lab-stale-a1", active)
        life("lab-stale-a1", state="working", t=now - 3600)
        _vm(api, "lab-idle-a1", ended, zone="us-central1-b")
        life("lab-idle-a1", state="idle", idle_until=now - 600)
        _vm(api, "lab-working-a1", ended)
        life("lab-working-a1", state="working", launch="gs://x/_launches/r/s", attempt=1)
        _vm(api, "lab-kept-a1", ended, lab_keep_until=str(int(time.time() + 3600)))
        _vm(api, "lab-booting-a1", "33333333-cccc-4000-8000-000000000003")
        sensor = build_vm_reaper_sensor(exp)
        reason = sensor(build_sensor_context(instance=gce_instance))
        text = reason.skip_message
        assert "deleted 2" in text, text
        assert "lab-stale-a1: its agent's heartbeat is stale" in text
        assert "lab-idle-a1: idle past its idle time" in text
        gce.wait_for(
            lambda: gce.find("lab-stale-a1") is None and gce.find("lab-idle-a1") is None,
            10,
            "the reaped VMs to go",
        )
        left = sorted(
            i.name for i in gce.live() if i.body["labels"].get("experiment") == "small-gce"
        )
        assert left == ["lab-booting-a1", "lab-kept-a1", "lab-working-a1"]

        assert gce_main(["vms", "list", "--experiment", str(GCE_EXPERIMENT)]) == 0
        out = capsys.readouterr().out
        assert re.search(r"lab-kept-a1 .* keep: kept on purpose", out)
        assert re.search(r"lab-working-a1 .* SUCCESS .* keep: agent alive: working", out)
        assert re.search(r"lab-booting-a1 .* keep: booting", out)
        # an age limit of zero: everything is too old, kept or not
        args = ["vms", "reap", "--max-age-h", "0", "--experiment", str(GCE_EXPERIMENT)]
        assert gce_main([*args, "--dry-run"]) == 0
        assert "would delete 3 of 3" in capsys.readouterr().out
        assert gce_main(args) == 0
        gce.wait_for(
            lambda: (
                not [i for i in gce.live() if i.body["labels"].get("experiment") == "small-gce"]
            ),
            10,
            "every VM reaped",
        )
    finally:
        gce.boot = True


def test_image_build_teardown_and_import(gce, monkeypatch):
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    exp = load_experiment(GCE_EXPERIMENT)
    mgr = image_manager(exp, bundle_install="skip", poll_s=0.2, timeout_s=120)
    api, gcs = mgr.api, Gcs()
    first_call = len(gce.calls)
    logs: list[str] = []

    name = mgr.build(require_cuda=False, log=logs.append)  # the fake has no GPU
    image = api.image_from_family("lab-test-project", "task-geometry-lab")
    assert image.name == name and image.source_disk.endswith(
        f"/disks/{name.replace('task-geometry-lab', 'lab-img')}"
    )
    health = gcs.read_json(f"gs://{BUCKET}/experiments/small-gce/_images/{name}/health.json")
    assert health["ok"] and health["torch"] and health["cuda"] is False
    assert not [i for i in gce.live() if i.name.startswith("lab-img-")]  # build VM deleted
    s = load_experiment(GCE_EXPERIMENT)
    from lab_assets.defs.resources import gce_settings

    link, prebaked = image_for(api, gce_settings(s))
    assert prebaked and link == image.self_link  # launches now boot the pre-baked image

    archive = mgr.teardown(log=logs.append)
    assert api.image_from_family("lab-test-project", "task-geometry-lab") is None
    assert not gce.disks or all("export" not in k[2] for k in gce.disks)
    with tarfile.open(fileobj=io.BytesIO(gcs.read_bytes(archive)), mode="r:gz") as tar:
        (member,) = tar.getmembers()
        assert member.name == "disk.raw"
        assert tar.extractfile(member).read().startswith(f"disk from {image.self_link}".encode())
    assert gzip.decompress(gcs.read_bytes(archive))[:8] == b"disk.raw"

    restored = mgr.import_(archive, log=logs.append)
    again = api.image_from_family("lab-test-project", "task-geometry-lab")
    assert restored == name and again.name == name
    assert again.raw_disk.source == archive.replace("gs://", "https://storage.googleapis.com/")

    def norm(method: str, path: str) -> str:
        path = path.split("/lab-test-project/")[1]
        path = re.sub(r"lab-export-disk-[0-9-]+", "DISK", path)
        path = re.sub(r"lab-export-[0-9-]+", "EXPORTER", path)
        path = re.sub(r"lab-img-[0-9-]+", "BUILDVM", path)
        return f"{method} {path.replace(name, 'IMAGE')}"

    mutations = [
        norm(m, p) for m, p in gce.calls[first_call:] if m != "GET" and "/operations/" not in p
    ]
    assert mutations == [
        "POST zones/us-central1-a/instances",  # build: temporary VM (DLVM image + bootstrap)
        "POST zones/us-central1-a/instances/BUILDVM/stop",  # health check passed
        "POST global/images",  # image from its boot disk, in the family
        "DELETE zones/us-central1-a/instances/BUILDVM",
        "POST zones/us-central1-a/disks",  # teardown: a disk from the image
        "POST zones/us-central1-a/instances",  # exporter VM with the disk attached
        "DELETE zones/us-central1-a/instances/EXPORTER",
        "DELETE zones/us-central1-a/disks/DISK",
        "DELETE global/images/IMAGE",  # archived, so the live image goes
        "POST global/images",  # import: rawDisk.source = the archive
    ]
