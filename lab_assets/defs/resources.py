"""The resources an experiment's definitions bind: storage, IO manager, model cache, launcher.

For an experiment with ``compute: {kind: gce}``, one place turns the experiment file
(its ``compute`` section is ``resources.compute.gce.settings.GceSettings``) into the
launcher's config (``LaunchSettings``), so the Dagster definitions, the
``lab launch`` / ``lab vms`` / ``lab image`` commands and the reaper sensor all
agree on project, zones, prices, budget and staging location.
"""

from __future__ import annotations

from typing import Any

from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.schema import GceCompute
from lab_assets.orchestration.instance import pool_limit
from resources.compute.gce.launcher import GceStepLauncherResource
from resources.compute.gce.settings import LaunchSettings
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
        # As many workers as the `cpu` pool lets run at once share the cores.
        launcher = LocalStepLauncher(concurrent_workers=pool_limit(exp))
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
    """The GCE launcher resource's config: the experiment's settings plus what a launch is for."""
    return {
        **gce_compute(exp).model_dump(exclude={"kind"}),
        "budget_usd": exp.file.budget.max_usd,
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


def gce_settings(exp: Experiment, **changes: Any) -> LaunchSettings:
    """A launch's settings from the experiment, `changes` (e.g. the per-run overrides) on top."""
    return LaunchSettings(**{**launcher_fields(exp), **changes})
