"""One launched step's VM, as data: its image, labels and insert spec, from the settings.

Pure functions from ``LaunchSettings`` and a placement to a ``vm_spec.VmSpec``
(the agent's instructions included), kept apart from the launch loop so that
``lab launch --dry-run`` builds the very body a real launch sends, without any
API call but the image lookup (which the dry run does not make).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.placement import Placement
from resources.compute.gce.settings import LaunchSettings

if TYPE_CHECKING:
    from resources.compute.gce.api import ComputeApi


def safe_step_key(step_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", step_key)


def image_for(api: ComputeApi, s: LaunchSettings) -> tuple[str, bool]:
    """(source image link, pre-baked?): the newest image of the family, else the DLVM family."""
    project = s.image_project or s.project
    image = api.image_from_family(project, s.image_family)
    if image is not None:
        return image.self_link, True
    return (
        f"projects/{s.fallback_image_project}/global/images/family/{s.fallback_image_family}",
        False,
    )


def vm_labels(s: LaunchSettings, run_id: str, step_key: str, partition: str | None, attempt: int):
    extra = {}
    if s.keep_vm:
        extra["lab_keep_until"] = str(int(time.time() + s.keep_vm_hours * 3600))
    return vmbody.labels(
        experiment=s.experiment,
        run=run_id,
        partition=partition or "none",
        step=step_key,
        attempt=str(attempt),
        **extra,
    )


def build_vm_spec(
    s: LaunchSettings,
    *,
    placement: Placement,
    name: str,
    source_image: str,
    prebaked: bool,
    launch_uri: str,
    attempt: int,
    run_id: str,
    step_key: str,
    partition: str | None,
    launch_info: dict[str, Any],
) -> vmbody.VmSpec:
    instructions = {
        "version": 1,
        "mode": "step",
        "launch_uri": launch_uri,
        "attempt": attempt,
        "bundle_install": s.bundle_install,
        "env": {
            "LAB_STORAGE_ROOT": s.storage_root,
            "GOOGLE_CLOUD_PROJECT": s.project,
            **s.env,
        },
        "flush_interval_s": s.flush_interval_s,
        "heartbeat_s": s.heartbeat_s,
        "grace_s": s.grace_s,
        "checkpoint_sync_s": s.checkpoint_sync_s,
        "preempted_poll_s": s.preempted_poll_s,
        "launch_info": launch_info,
        "partition": partition,
        "step_key": step_key,
        "run_id": run_id,
    }
    extra = {} if prebaked else {"install-nvidia-driver": "True"}
    return vmbody.VmSpec(
        project=s.project,
        zone=placement.zone,
        name=name,
        machine_type=placement.machine_type,
        source_image=source_image,
        gpu_type=placement.gpu_type,
        gpu_count=placement.gpu_count,
        spot=s.spot,
        boot_disk_gb=s.boot_disk_gb,
        max_run_duration_s=s.max_run_duration_s,
        service_account=s.service_account,
        network=s.network,
        subnetwork=s.subnetwork,
        external_ip=s.external_ip,
        labels=vm_labels(s, run_id, step_key, partition, attempt),
        instructions=instructions,
        extra_metadata=extra,
    )
