"""Dagster entry point: `dagster dev -m lab_assets.definitions` (or `workspace.yaml`).

Assembles only. `build_definitions(exp)` is a function of an `Experiment`; the
module-level `defs` loads the experiment named by `$LAB_EXPERIMENT` (default
`./experiments/tiny.yaml`) when Dagster asks for it, so an invalid file stops the
code location from loading with an error naming the file and field. Runs that the
lab drives itself rebuild their job with `experiment_job`, from the experiment's
text, in whichever process runs a step. Nothing imports this module.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import dagster as dg

from lab_assets.defs.assets import build_assets
from lab_assets.defs.jobs import asset_jobs, build_sweep_job
from lab_assets.defs.partitions import build_partitions
from lab_assets.defs.resources import build_resources
from lab_assets.defs.schedules import build_sweep_schedule
from lab_assets.defs.sensors import build_reconcile_sensor, build_vm_reaper_sensor
from lab_assets.experiment.load import load_experiment, parse_experiment
from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.schema import GceCompute


def build_definitions(exp: Experiment) -> dg.Definitions:
    resources = build_resources(exp)
    storage = resources["lab_storage"]
    sensors = [build_reconcile_sensor(exp, storage)]
    if isinstance(exp.file.compute, GceCompute):
        sensors.append(build_vm_reaper_sensor(exp))
    schedule = build_sweep_schedule(exp, storage)
    return dg.Definitions(
        assets=build_assets(exp, build_partitions(exp)),
        jobs=[*asset_jobs(), build_sweep_job(exp)],
        schedules=[schedule] if schedule else [],
        sensors=sensors,
        resources=resources,
        executor=dg.in_process_executor,
    )


@lru_cache(maxsize=8)
def _definitions_for(text: str, path: str, storage_root: str) -> dg.Definitions:
    return build_definitions(parse_experiment(text, Path(path), storage_root))


def experiment_job(text: str, path: str, storage_root: str, job_name: str) -> dg.JobDefinition:
    """One job of the experiment given as text (the reconstructor of `build_reconstructable_job`)."""
    return _definitions_for(text, path, storage_root).resolve_job_def(job_name)


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_experiment())
