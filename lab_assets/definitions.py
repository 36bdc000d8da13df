"""Dagster entry point: `dagster dev -m lab_assets.definitions` (or `workspace.yaml`).

Assembles only. `build_definitions(exp)` is a function of an `Experiment`; the
module-level `defs` loads the experiment named by `$LAB_EXPERIMENT` (default
`./experiments/tiny.yaml`) when Dagster asks for it, so an invalid file stops the
code location from loading with an error naming the file and field. Runs that the
lab drives itself rebuild their job with `experiment_job`, from the experiment's
text, in whichever process runs a step. Only `all_experiments` (several experiments
in one UI) imports this module.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import dagster as dg

from lab_assets.defs.assets import build_assets
from lab_assets.defs.automation import experiment_condition
from lab_assets.defs.jobs import asset_jobs
from lab_assets.defs.partitions import build_partitions
from lab_assets.defs.resources import build_resources
from lab_assets.defs.schedules import build_rebuild_sensor
from lab_assets.defs.sensors import (
    build_reconcile_sensor,
    build_staleness_sensor,
    build_vm_reaper_sensor,
)
from lab_assets.experiment.load import load_experiment, parse_experiment
from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.schema import GceCompute
from lab_assets.orchestration.instance import apply_pool_limits


def definitions_args(exp: Experiment) -> dict[str, Any]:
    """What `exp` defines, as the keyword arguments of `dg.Definitions`."""
    resources = build_resources(exp)
    storage = resources["lab_storage"]
    sensors = [
        build_reconcile_sensor(exp, storage),
        build_staleness_sensor(exp, storage),
        build_rebuild_sensor(exp),
    ]
    if isinstance(exp.file.compute, GceCompute):
        sensors.append(build_vm_reaper_sensor(exp))
    condition = experiment_condition(exp, storage)
    assets = dg.map_asset_specs(
        lambda spec: spec.replace_attributes(automation_condition=condition),
        build_assets(exp, build_partitions(exp)),
    )
    if exp.asset_prefix:  # several experiments in one instance: `<experiment>/<asset>`
        assets = [
            a.with_attributes(
                asset_key_replacements={k: dg.AssetKey(exp.key_path(k.path[-1])) for k in a.keys}
            )
            for a in assets
        ]
    return {
        "assets": assets,
        "jobs": asset_jobs(exp),
        "sensors": sensors,
        "resources": resources,
        "executor": dg.in_process_executor,
    }


def build_definitions(exp: Experiment) -> dg.Definitions:
    return dg.Definitions(**definitions_args(exp))


@lru_cache(maxsize=8)
def _definitions_for(
    text: str, path: str, storage_root: str, asset_prefix: tuple[str, ...]
) -> dg.Definitions:
    exp = parse_experiment(text, Path(path), storage_root)
    return build_definitions(exp.model_copy(update={"asset_prefix": asset_prefix}))


def experiment_job(
    text: str, path: str, storage_root: str, job_name: str, asset_prefix: tuple[str, ...] = ()
) -> dg.JobDefinition:
    """One job of the experiment given as text (the reconstructor of `build_reconstructable_job`);
    the key prefix travels with it, so every process builds the same asset keys."""
    return _definitions_for(text, path, storage_root, tuple(asset_prefix)).resolve_job_def(job_name)


@dg.definitions
def defs() -> dg.Definitions:
    exp = load_experiment()
    apply_pool_limits(exp)
    return build_definitions(exp)
