"""Dagster entry for a shared UI: every experiment file under one folder, side by side.

`dagster dev -w workspace.all.yaml` (or `-m lab_assets.all_experiments`) loads each
``*.yaml`` under ``$LAB_EXPERIMENTS_DIR`` (default ``./experiments``) as its own
repository of one code location, named after the experiment, with its own
resources, sensors and jobs: the UI lists them side by side and the Asset catalog
groups them by key prefix.

Asset keys carry the experiment's name (``tiny_geometry/adapter``): a Dagster
instance keeps one materialisation history per asset key, whatever the code location,
so two experiments' plain ``adapter`` would share (and corrupt) one history and one
set of partitions. Every ``lab`` command run against such an instance must record the
same keys, so the prefix is switched on for all of them by one environment variable,
``LAB_PREFIX_ASSET_KEYS=1``; this module refuses to load without it rather than show
keys that ``lab materialize`` would not write. The single-experiment entry
(``-m lab_assets.definitions``, ``workspace.yaml``) keeps the plain keys.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import RepositoryDefinition
from dagster._core.definitions.definitions_class import create_repository_using_definitions_args

from lab_assets.definitions import definitions_args
from lab_assets.experiment.load import PREFIX_ENV, key_prefix, load_experiment, prefixed_keys
from lab_assets.experiment.schema import ExperimentError
from lab_assets.orchestration.instance import apply_pool_limits

EXPERIMENTS_DIR_ENV = "LAB_EXPERIMENTS_DIR"


def experiment_files(folder: str | os.PathLike[str] | None = None) -> list[Path]:
    """The experiment files to load, sorted: ``*.yaml`` in `folder`, else
    ``$LAB_EXPERIMENTS_DIR``, else ``./experiments``."""
    d = Path(folder or os.environ.get(EXPERIMENTS_DIR_ENV) or "experiments").resolve()
    files = sorted(d.glob("*.yaml"))
    if not files:
        raise ExperimentError(
            f"{d}: no experiment files (*.yaml) there; run from the lab's checkout or set "
            f"${EXPERIMENTS_DIR_ENV}"
        )
    return files


def build_repositories(files: list[Path]) -> dict[str, RepositoryDefinition]:
    """One repository per experiment file, by its name as a Python identifier."""
    if not prefixed_keys():
        raise ExperimentError(
            f"several experiments in one Dagster instance need ${PREFIX_ENV}=1 (asset keys "
            "prefixed with the experiment's name, so that two experiments' keys never "
            f"collide): export {PREFIX_ENV}=1 for `dagster dev` and for every `lab` command "
            "against this instance"
        )
    repos: dict[str, RepositoryDefinition] = {}
    origin: dict[str, Path] = {}
    for path in files:
        exp = load_experiment(path, named_by=f"${EXPERIMENTS_DIR_ENV}")
        name = key_prefix(exp.name)
        if name in repos:
            raise ExperimentError(
                f"{path}: experiment name {exp.name!r} is also the name in {origin[name]}; "
                "each experiment loaded side by side needs its own name"
            )
        apply_pool_limits(exp)
        repos[name] = create_repository_using_definitions_args(name=name, **definitions_args(exp))
        origin[name] = path
    return repos


globals().update(build_repositories(experiment_files()))
