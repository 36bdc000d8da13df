"""From an experiment's ``compute: {kind: gce}`` section to the GCE launcher's settings.

One place turns the experiment file (validated by ``config``) into the values the
generic launcher in ``resources/`` takes, so the Dagster definitions, the
``lab launch`` / ``lab vms`` / ``lab image`` commands and the reaper sensor all
agree on project, zones, prices, budget and staging location.
"""

from __future__ import annotations

from typing import Any

from lab_assets.config import Experiment, GceCompute
from resources.step_launchers.gce import GceSettings, GceStepLauncherResource


def gce_compute(exp: Experiment) -> GceCompute:
    if not isinstance(exp.file.compute, GceCompute):
        raise ValueError(f"{exp.path}: compute.kind is {exp.file.compute.kind!r}, not 'gce'")
    return exp.file.compute


def launcher_fields(exp: Experiment) -> dict[str, Any]:
    """The GCE launcher resource's config, from the experiment."""
    c = gce_compute(exp)
    return {
        "project": c.project,
        "zones": list(c.zones),
        "machine_type": c.machine_type,
        "gpu_type": c.gpu_type,
        "gpu_count": c.gpu_count,
        "spot": c.spot,
        "image_family": c.image_family,
        "image_project": c.image_project,
        "fallback_image_family": c.fallback_image_family,
        "fallback_image_project": c.fallback_image_project,
        "boot_disk_gb": c.boot_disk_gb,
        "max_run_duration_s": c.max_run_duration_s,
        "max_preemptions": c.max_preemptions,
        "service_account": c.service_account,
        "hourly_usd": dict(c.hourly_usd),
        "gpu_zones": {g: {z: list(t) for z, t in zs.items()} for g, zs in c.gpu_zones.items()},
        "budget_usd": exp.file.budget.max_usd,
        "keep_vm": c.keep_vm,
        "keep_vm_hours": c.keep_vm_hours,
        "storage_root": exp.storage_root,
        "experiment": exp.name,
        "experiment_file": str(exp.path),
    }


def gce_launcher_resource(exp: Experiment):
    """The `step_launcher` resource for a gce experiment.

    Configured at launch, so a run may set ``zone``, ``machine_type_override``,
    ``gpu_type_override`` or ``keep_vm`` under ``resources.step_launcher.config``.
    """
    return GceStepLauncherResource.configure_at_launch(**launcher_fields(exp))


def gce_settings(exp: Experiment, **changes: Any) -> GceSettings:
    return GceStepLauncherResource(**{**launcher_fields(exp), **changes}).settings()
