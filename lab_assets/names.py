"""Names shared across the lab: assets, jobs, pools, sensors and tag keys (a leaf module).

Everything that refers to a job or a pool by name imports it from here, so nothing
needs the module that assembles the definitions.
"""

from __future__ import annotations

# Assets, upstream first.
BASE_MODEL = "base_model"
BASE_SPECTRUM = "base_spectrum"
ADAPTER = "adapter"
SPECTRAL_FEATURES = "spectral_features"
CLASSIFICATION = "classification_results"
ASSET_GROUP = "task_geometry"

# Jobs.
BASE_MODELS_JOB = "base_models_job"
ADAPTERS_JOB = "adapters_job"
CLASSIFICATION_JOB = "classification_job"

# Schedules and sensors.
REBUILD_SENSOR = "rebuild_stale_and_missing"  # automation: stale + missing, stopped by default
STALENESS_SENSOR = "lab_staleness"  # records why a partition is stale
RECONCILE_SENSOR = "reconcile_from_storage"
REAPER_SENSOR = "gce_vm_reaper"

# Pools: training steps claim a slot of `gpu` on GCE (limit: the GPU quota) or of
# `cpu` locally (limit: the machine's cores).
GPU_POOL = "gpu"
CPU_POOL = "cpu"

# Run tags.
REASON_TAG = "lab/reason"
INVOCATION_TAG = "lab/invocation"  # which `lab` command submitted a backfill
SWEEP_RUNS_TAG = "lab/sweep_runs"
SWEEP_PLAN_TAG = "lab/sweep_plan"
RUN_WORKER_TAG = "lab/run_worker"  # host, pid and start time of the run's worker process
OWNER_TAG = "lab/owner"  # host, pid and start time of the `lab` process that submitted a backfill
