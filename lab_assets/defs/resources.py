"""The resources an experiment's definitions bind: storage, IO manager, model cache, launcher.

For an experiment with ``compute: {kind: gce}``, one place turns the experiment file (validated by ``config``) into the values the
generic launcher in ``resources/`` takes, so the Dagster definitions, the
``lab launch`` / ``lab vms`` / ``lab image`` commands and the reaper sensor all
agree on project, zones, prices, budget and staging location.
"""

from __future__ import annotations

from typing import Any

from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.schema import GceCompute
from resources.compute.gce.launcher import GceSettings, GceStepLauncherResource
from resources.compute.local.launcher import LocalStepLauncher
from resources.io_manager import ArtifactIOManager, LabStorage
from resources.model_cache import ModelCache


def lab_storage(exp: Experiment) -> LabStorage:
    return LabStorage(root=exp.storage_root, experiment=exp.name)


def model_cache_uri(exp: Experiment) -> str | None:
    """A gs:// lab shares one GCS model cache per storage root, beside the experiments."""
    return f"{exp.storage_root}/_model-cache" if exp.storage_root.startswith("gs://") else None


def build_resources(exp: Experiment) -> dict[str, Any]:
    """Resource key -> resource; GPU steps go to a GCE VM or a local worker per `compute`."""
    storage = lab_storage(exp)
    if isinstance(exp.file.compute, GceCompute):
        launcher = gce_launcher_resource(exp)
    else:
        launcher = LocalStepLauncher()
    return {
        "lab_storage": storage,
        "io_manager": ArtifactIOManager(storage=storage),
        "step_launcher": launcher,
        "model_cache": ModelCache(gcs_uri=model_cache_uri(exp)),
    }


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
