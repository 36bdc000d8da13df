"""Dagster entry point: `dagster dev -m lab_assets.definitions` (or `workspace.yaml`).

The experiment file (``$LAB_EXPERIMENT``, default ``experiments/tiny.yaml``) is
loaded and validated here, so an invalid file stops the code location from
loading with an error naming the file and field, and nothing runs.
"""

from __future__ import annotations

from dagster import (
    AssetSelection,
    Definitions,
    define_asset_job,
    in_process_executor,
)

from lab_assets.assets import build_assets
from lab_assets.compute import gce_launcher_resource
from lab_assets.config import Experiment, GceCompute, load_experiment
from lab_assets.partitions import build_partitions
from lab_assets.schedules import build_reconcile_sensor, build_sweep_job, build_sweep_schedule
from lab_assets.sensors import build_vm_reaper_sensor
from resources.io_manager import ArtifactIOManager, LabStorage
from resources.model_cache import ModelCache
from resources.step_launchers.local import LocalStepLauncher

BASE_MODELS_JOB = "base_models_job"
ADAPTERS_JOB = "adapters_job"
CLASSIFICATION_JOB = "classification_job"


def model_cache_uri(exp: Experiment) -> str | None:
    """A gs:// lab shares one GCS model cache per storage root, beside the experiments."""
    return f"{exp.storage_root}/_model-cache" if exp.storage_root.startswith("gs://") else None


def build_definitions(exp: Experiment) -> Definitions:
    parts = build_partitions(exp)
    assets = build_assets(exp, parts)
    storage = LabStorage(root=exp.storage_root, experiment=exp.name)
    sensors = []
    if isinstance(exp.file.compute, GceCompute):
        # Each adapter partition on its own disposable VM; a sensor reaps forgotten VMs.
        launcher = gce_launcher_resource(exp)
        sensors.append(build_vm_reaper_sensor(exp))
    else:
        launcher = LocalStepLauncher()
    jobs = [
        define_asset_job(
            BASE_MODELS_JOB,
            AssetSelection.assets("base_model", "base_spectrum"),
            description="Build or fetch one base model and its spectrum.",
        ),
        define_asset_job(
            ADAPTERS_JOB,
            AssetSelection.assets("adapter", "spectral_features"),
            description="Train one adapter and measure its spectral features.",
        ),
        define_asset_job(
            CLASSIFICATION_JOB,
            AssetSelection.assets("classification_results"),
            description="Classify method and task from every adapter's features.",
        ),
        build_sweep_job(exp),
    ]
    schedule = build_sweep_schedule(exp, storage)
    return Definitions(
        assets=assets,
        jobs=jobs,
        schedules=[schedule] if schedule else [],
        sensors=[build_reconcile_sensor(exp, storage), *sensors],
        resources={
            "lab_storage": storage,
            "io_manager": ArtifactIOManager(storage=storage),
            "step_launcher": launcher,
            "model_cache": ModelCache(gcs_uri=model_cache_uri(exp)),
        },
        executor=in_process_executor,
    )


experiment = load_experiment()
defs = build_definitions(experiment)
