"""The image manager against the fake, where real GCE differs from a naive fake.

- ``images.insert`` runs for minutes on GCE (a 100 GB disk): it is waited on with its
  own deadline, its progress logged, and a deadline that passes says how to follow up.
- Two disks copied from one image carry one filesystem id: the fake records a VM whose
  disks clash and its guest never comes up (the bad case of GCE's race); the teardown
  exporter boots another lineage (Debian), so nothing clashes and the export works.
"""

from __future__ import annotations

import io
import tarfile

import pytest
from google.cloud import compute_v1

from lab_assets_tests.gce_fixtures import BUCKET
from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.api import ComputeApi
from resources.compute.gce.errors import GceApiError
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.images import EXPORT_IMAGE, ImageError, ImageManager
from resources.compute.gce.placement import Placement

pytest_plugins = ["lab_assets_tests.gce_fixtures"]

PROJECT = "lab-test-project"
ZONE = "us-central1-a"


@pytest.fixture
def slow_images(gce):
    """The fake's images.insert operations run for 3 s, as a big image's run for minutes."""
    gce.image_insert_s = 3.0
    yield gce
    gce.image_insert_s = 0.0


def _raw_image(name: str, family: str) -> compute_v1.Image:
    return compute_v1.Image(
        name=name,
        family=family,
        raw_disk=compute_v1.RawDisk(
            source=f"https://storage.googleapis.com/{BUCKET}/{name}.tar.gz"
        ),
    )


def _manager(family: str, **changes) -> ImageManager:
    return ImageManager(
        api=ComputeApi(PROJECT),
        gcs=Gcs(),
        project=PROJECT,
        family=family,
        staging=f"gs://{BUCKET}/images-test",
        placements=[Placement(ZONE, "g2-standard-4", "nvidia-l4", 1)],
        bundle_install="skip",
        poll_s=0.1,
        timeout_s=120,
        **changes,
    )


def test_image_insert_waits_past_the_shared_operation_deadline_logging_progress(slow_images):
    mgr = _manager("lab-slow", progress_every_s=0.5)
    mgr.api.op_timeout_s = 0.5  # the shared per-operation wait: shorter than this insert
    archive = f"gs://{BUCKET}/images-test/lab-slow-1.tar.gz"
    mgr.gcs.upload_bytes(archive, b"an archived disk")
    logs: list[str] = []

    assert mgr.import_(archive, name="lab-slow-1", log=logs.append) == "lab-slow-1"

    image = mgr.api.image_from_family(PROJECT, "lab-slow")
    assert image is not None and image.name == "lab-slow-1" and image.status == "READY"
    progress = [line for line in logs if line.startswith("images.insert lab-slow-1: ")]
    pcts = [int(line.split(": ")[1].split("%")[0]) for line in progress]
    assert len(set(pcts)) >= 2 and pcts == sorted(pcts), logs  # seen climbing, in order
    assert all("(waiting up to 3600s)" in line for line in progress)
    mgr.api.delete_image("lab-slow-1")


def test_an_image_insert_past_its_own_deadline_says_how_to_follow_it(slow_images):
    api = ComputeApi(PROJECT)
    with pytest.raises(GceApiError) as err:
        api.insert_image_long(_raw_image("lab-late-1", "lab-late"), timeout_s=0.3, poll_s=0.05)
    assert err.value.code == "TIMEOUT"
    msg = str(err.value)
    assert "images.insert lab-late-1" in msg and "may still finish" in msg
    assert "gcloud compute operations describe operation-" in msg and "--global" in msg
    # as on GCE, the image is PENDING until its operation is DONE, then READY
    slow_images.wait_for(
        lambda: api.image_from_family(PROJECT, "lab-late") or None, 10, "the late image"
    )
    api.delete_image("lab-late-1")


def _insert_vm(api: ComputeApi, name: str, boot_image: str, disk_link: str) -> None:
    spec = vmbody.VmSpec(
        project=PROJECT,
        zone=ZONE,
        name=name,
        machine_type="e2-standard-4",
        source_image=boot_image,
        spot=False,
        labels=vmbody.labels(purpose="fs-test"),
        instructions={"mode": "export-disk"},
        extra_disks=(("export", disk_link),),
    )
    api.insert_instance(ZONE, vmbody.build_instance(spec))


def test_a_vm_with_two_disks_from_one_image_never_comes_up_in_the_fake(gce):
    api = ComputeApi(PROJECT)
    api.insert_image_long(_raw_image("lab-twin-1", "lab-twin"), timeout_s=60, poll_s=0.05)
    image = api.image_from_family(PROJECT, "lab-twin")
    api.insert_disk(ZONE, compute_v1.Disk(name="twin-disk", source_image=image.self_link))
    link = f"projects/{PROJECT}/zones/{ZONE}/disks/twin-disk"
    before = len(gce.fs_id_clashes)
    try:
        _insert_vm(api, "twin-vm", image.self_link, link)  # GCE accepts it...
        gce.wait_for(lambda: len(gce.fs_id_clashes) > before, 10, "the clash to be recorded")
        clash = gce.fs_id_clashes[-1]
        assert clash["instance"] == "twin-vm" and clash["disks"] == ["boot", "export"]
        # ...but the guest may mount the wrong root: the fake takes that case
        assert gce.find("twin-vm").proc is None
        assert "two disks carry filesystem" in gce.serial_output("twin-vm")
    finally:
        api.delete_instance(ZONE, "twin-vm")
        api.delete_disk(ZONE, "twin-disk")
        api.delete_image("lab-twin-1")


def test_teardown_exports_from_an_exporter_of_another_lineage(gce):
    gcs = Gcs()
    mgr = _manager("lab-export")
    mgr.api.insert_image_long(_raw_image("lab-export-1", "lab-export"), timeout_s=60, poll_s=0.05)
    image = mgr.api.image_from_family(PROJECT, "lab-export")
    before, inserted = len(gce.fs_id_clashes), len(gce.inserted)
    logs: list[str] = []

    archive = mgr.teardown(log=logs.append)

    (exporter,) = [b for b in gce.inserted[inserted:] if b["name"].startswith("lab-export-")]
    boot = next(d for d in exporter["disks"] if d.get("boot"))
    data = next(d for d in exporter["disks"] if not d.get("boot"))
    assert boot["initializeParams"]["sourceImage"] == EXPORT_IMAGE
    assert data["deviceName"] == "export" and "/disks/lab-export-disk-" in data["source"]
    assert len(gce.fs_id_clashes) == before  # one filesystem id per disk
    with tarfile.open(fileobj=io.BytesIO(gcs.read_bytes(archive)), mode="r:gz") as tar:
        (member,) = tar.getmembers()
        assert tar.extractfile(member).read().startswith(f"disk from {image.self_link}".encode())
    assert mgr.api.image_from_family(PROJECT, "lab-export") is None  # archived, then deleted


@pytest.mark.parametrize(
    "boot",
    [
        f"projects/{PROJECT}/global/images/family/lab-same",
        f"https://www.googleapis.com/compute/v1/projects/{PROJECT}/global/images/lab-same-1",
        f"projects/{vmbody.DLVM_PROJECT}/global/images/family/{vmbody.DLVM_FAMILY}",
    ],
    ids=["its-family", "itself", "its-base-image"],
)
def test_an_exporter_booting_the_exported_lineage_is_refused(gce, boot):
    mgr = _manager("lab-same", export_image=boot)
    mgr.api.insert_image_long(_raw_image("lab-same-1", "lab-same"), timeout_s=60, poll_s=0.05)
    calls = len(gce.calls)
    try:
        with pytest.raises(ImageError, match="share the exporter's boot filesystem id"):
            mgr.teardown(log=lambda _: None)
        assert not [c for c in gce.calls[calls:] if c[0] != "GET"]  # nothing created
    finally:
        mgr.api.delete_image("lab-same-1")
