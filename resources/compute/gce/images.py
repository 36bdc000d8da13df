"""The pre-baked VM image: build it, archive it to GCS, restore it. Compute API calls only.

- ``build``: a temporary on-demand GPU VM boots a Deep Learning VM image; the
  startup script bootstraps ``/opt/lab/venv``, the agent (mode ``image-build``)
  pip-installs the bundle (a wheel of the working tree) with its dependencies and
  runs the health check (torch imports, CUDA works, the base model loads), whose
  report lands in GCS. If healthy: ``instances.stop``, then ``images.insert`` with
  ``sourceDisk`` = the VM's boot disk, in the image family (GCE's own way to make
  an image: from a stopped VM's boot disk). The VM is deleted whatever happens.
- ``teardown``: archive the family's current image to GCS, then delete it (a live
  image costs storage every month; an archive in a cold bucket costs less). The
  Compute API cannot export an image by itself, so, as GCE's own export workflow
  does: ``disks.insert`` a disk from the image, boot a small exporter VM from an
  image of *another lineage* (``export_image``, Debian by default) with that disk
  attached, and the agent (mode ``export-disk``) streams the device into
  ``<archive>.tar.gz`` holding ``disk.raw``; then delete the VM, the disk and the
  image, and write ``<archive>.json`` describing the image. The exporter never
  boots the image it exports (nor the Deep Learning VM image it was built from): a
  boot disk and a data disk copied from one image carry one filesystem id, and a
  guest that mounts by UUID or label may take the wrong one as its root.
- ``import_``: ``images.insert`` with ``rawDisk.source`` = the archive (the format
  written above), back into the family.

``images.insert`` from a 100 GB disk or archive takes minutes: it is waited on with
its own deadline (``image_timeout_s``), not the API wrapper's per-operation one,
and its progress is logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from google.cloud import compute_v1

from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.api import ComputeApi
from resources.compute.gce.gcs import Gcs, https_url
from resources.compute.gce.placement import Placement, create_with_failover

Log = Callable[[str], None]
# A public image of another lineage than the Deep Learning VM images the lab's are built from.
EXPORT_IMAGE = "projects/debian-cloud/global/images/family/debian-12"


class ImageError(RuntimeError):
    pass


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


@dataclass
class ImageManager:
    api: ComputeApi
    gcs: Gcs
    project: str
    family: str
    staging: str  # gs://bucket/prefix for bundles, reports and archives
    placements: list[Placement]  # where the build VM may go (GPU zones, failover order)
    base_image: str = f"projects/{vmbody.DLVM_PROJECT}/global/images/family/{vmbody.DLVM_FAMILY}"
    export_machine_type: str = "e2-standard-4"
    boot_disk_gb: int = 100
    service_account: str | None = None
    network: str = "global/networks/default"
    subnetwork: str | None = None
    external_ip: bool = True
    # The exporter's boot image: any image not descended from the one being exported.
    export_image: str = EXPORT_IMAGE
    bundle_install: str = "pip"
    poll_s: float = 10.0
    timeout_s: float = 3600.0
    image_timeout_s: float = 3600.0  # one images.insert (from a disk or an archive)
    progress_every_s: float = 60.0
    max_run_duration_s: int = 3 * 3600

    def _wait_report(self, uri: str, vm: str, zone: str, log: Log) -> dict:
        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            report = self.gcs.read_json(uri)
            if report is not None:
                return report
            inst = self.api.get_instance(zone, vm)
            if inst is None or inst.status == "TERMINATED":
                raise ImageError(f"VM {vm} stopped before reporting to {uri}")
            time.sleep(self.poll_s)
        raise ImageError(f"no report at {uri} after {self.timeout_s:.0f}s (VM {vm} in {zone})")

    def _insert_image(self, image: compute_v1.Image, log: Log) -> None:
        """``images.insert``, waited on for up to ``image_timeout_s`` with progress logged."""
        self.api.insert_image_long(
            image,
            timeout_s=self.image_timeout_s,
            poll_s=self.poll_s,
            progress=log,
            progress_every_s=self.progress_every_s,
        )

    def _check_export_image(self, image: compute_v1.Image) -> None:
        """Refuse an exporter boot image that shares the exported image's lineage."""
        boot = _rel(self.export_image)
        same = {
            _rel(image.self_link),
            f"projects/{self.project}/global/images/family/{self.family}",
            _rel(self.base_image),
        }
        if image.family:
            same.add(f"projects/{self.project}/global/images/family/{image.family}")
        if boot in same:
            raise ImageError(
                f"export_image {self.export_image} is {image.name} or the image it was built "
                f"from ({self.base_image}): a disk copied from {image.name} would share the "
                "exporter's boot filesystem id; boot the exporter from another lineage "
                f"(default {EXPORT_IMAGE})"
            )

    def _vm(
        self,
        name: str,
        placement: Placement,
        source_image: str,
        instructions: dict,
        purpose: str,
        extra_disks: tuple[tuple[str, str], ...] = (),
        nvidia_driver: bool = False,
    ) -> compute_v1.Instance:
        spec = vmbody.VmSpec(
            project=self.project,
            zone=placement.zone,
            name=name,
            machine_type=placement.machine_type,
            source_image=source_image,
            gpu_type=placement.gpu_type or None,
            gpu_count=placement.gpu_count,
            spot=False,
            boot_disk_gb=self.boot_disk_gb,
            max_run_duration_s=self.max_run_duration_s,
            service_account=self.service_account,
            network=self.network,
            subnetwork=self.subnetwork,
            external_ip=self.external_ip,
            labels=vmbody.labels(purpose=purpose, family=self.family),
            instructions=instructions,
            extra_metadata={"install-nvidia-driver": "True"} if nvidia_driver else {},
            extra_disks=extra_disks,
        )
        return vmbody.build_instance(spec)

    def build(
        self,
        *,
        wheel_path=None,
        require_cuda: bool = True,
        health_model: str | None = None,
        health_revision: str | None = None,
        import_modules: tuple[str, ...] = ("resources",),
        log: Log = print,
    ) -> str:
        """Build a new image in the family; returns its name."""
        stamp = _stamp()
        image_name = f"{self.family}-{stamp}"[:63]
        vm = f"lab-img-{stamp}"
        base = f"{self.staging}/_images/{image_name}"
        if self.bundle_install == "pip":
            from resources.compute.gce.bundle import build_wheel

            wheel = wheel_path or build_wheel()
            self.gcs.upload_file(f"{base}/bundle/{wheel.name}", wheel)
        instructions = {
            "mode": "image-build",
            "bundle_uri": f"{base}/bundle",
            "report_uri": f"{base}/health.json",
            "bundle_install": self.bundle_install,
            "require_cuda": require_cuda,
            "health_model": health_model,
            "health_model_revision": health_revision,
            "import_modules": list(import_modules),  # checked to import from the bundle
        }
        zone = None
        try:

            def create(p: Placement) -> None:
                nonlocal zone
                self.api.insert_instance(
                    p.zone,
                    self._vm(
                        vm, p, self.base_image, instructions, "image-build", nvidia_driver=True
                    ),
                )
                zone = p.zone

            result = create_with_failover(self.placements, create, log)
            log(f"build VM {vm} in {result.placement.zone}; waiting for the health report")
            report = self._wait_report(f"{base}/health.json", vm, result.placement.zone, log)
            if not report.get("ok"):
                raise ImageError(f"health check failed on {vm}: {report}")
            log(f"health check passed: {report}")
            self.api.stop_instance(result.placement.zone, vm)
            image = compute_v1.Image(
                name=image_name,
                family=self.family,
                source_disk=f"projects/{self.project}/zones/{result.placement.zone}/disks/{vm}",
                labels=vmbody.labels(built_by="lab-image-build"),
                description=f"lab image, health: torch {report.get('torch')}, "
                f"cuda {report.get('cuda')}, {report.get('device', 'no device')}",
            )
            log(f"creating image {image_name} from {vm}'s {self.boot_disk_gb} GB boot disk")
            self._insert_image(image, log)
            log(f"image {image_name} created in family {self.family}")
            return image_name
        finally:
            if zone is not None:
                self.api.delete_instance(zone, vm)
                log(f"build VM {vm} deleted")

    def teardown(self, archive_uri: str | None = None, log: Log = print) -> str:
        """Archive the family's current image to GCS and delete it; returns the archive URI."""
        image = self.api.image_from_family(self.project, self.family)
        if image is None:
            raise ImageError(f"no image in family {self.family} (project {self.project})")
        self._check_export_image(image)
        archive = archive_uri or f"{self.staging}/_images/archive/{image.name}.tar.gz"
        report_uri = f"{archive}.export.json"
        stamp = _stamp()
        disk, vm = f"lab-export-disk-{stamp}", f"lab-export-{stamp}"
        zone = self.placements[0].zone
        disk_link = f"projects/{self.project}/zones/{zone}/disks/{disk}"
        self.api.insert_disk(
            zone,
            compute_v1.Disk(name=disk, source_image=image.self_link, size_gb=image.disk_size_gb),
        )
        created = False
        try:
            instructions = {
                "mode": "export-disk",
                "device_name": "export",
                "archive_uri": archive,
                "report_uri": report_uri,
            }
            where = Placement(zone, self.export_machine_type, "", 0)
            self.api.insert_instance(
                zone,
                self._vm(
                    vm,
                    where,
                    self.export_image,
                    instructions,
                    "image-export",
                    extra_disks=(("export", disk_link),),
                ),
            )
            created = True
            log(f"exporter VM {vm} streaming {image.name} to {archive}")
            report = self._wait_report(report_uri, vm, zone, log)
            if not report.get("ok"):
                raise ImageError(f"export failed on {vm}: {report}")
        finally:
            if created:
                self.api.delete_instance(zone, vm)
            self.api.delete_disk(zone, disk)
        self.gcs.write_json(
            f"{archive}.json",
            {
                "name": image.name,
                "family": image.family,
                "description": image.description,
                "labels": dict(image.labels),
                "disk_size_gb": image.disk_size_gb,
                "archived_at": time.time(),
                "bytes": report.get("bytes"),
            },
        )
        self.api.delete_image(image.name)
        log(f"image {image.name} archived to {archive} and deleted")
        return archive

    def import_(self, archive_uri: str, name: str | None = None, log: Log = print) -> str:
        """Restore an archived image into the family; returns its name."""
        if not self.gcs.exists(archive_uri):
            raise ImageError(f"{archive_uri}: no such archive")
        about = self.gcs.read_json(f"{archive_uri}.json") or {}
        image_name = name or about.get("name") or f"{self.family}-{_stamp()}"
        self._insert_image(
            compute_v1.Image(
                name=image_name,
                family=self.family,
                raw_disk=compute_v1.RawDisk(source=https_url(archive_uri)),
                description=about.get("description") or f"restored from {archive_uri}",
                labels=vmbody.labels(restored_from="archive"),
            ),
            log,
        )
        log(f"image {image_name} restored into family {self.family} from {archive_uri}")
        return image_name


def _rel(link: str) -> str:
    """`projects/...` from a full or relative Compute resource link."""
    return link[link.index("projects/") :] if "projects/" in link else link
