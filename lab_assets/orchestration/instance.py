"""The Dagster instance the lab drives: where it lives, and the pool limits it enforces."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import DagsterInstance

from lab_assets.experiment.resolved import Experiment
from lab_assets.names import GPU_POOL

DEFAULT_DAGSTER_HOME = ".dagster_home"
DAGSTER_YAML = """\
# Written by `lab`. Local run/event storage (SQLite) under this directory.
telemetry:
  enabled: false
"""


def ensure_dagster_home() -> Path:
    """`$DAGSTER_HOME`, defaulting to ./.dagster_home, created with a dagster.yaml if new."""
    home = Path(os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def set_gpu_pool_limit(instance: DagsterInstance, exp: Experiment) -> None:
    """Cap concurrent GPU steps (the `gpu` pool) at the experiment's GPU quota."""
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, exp.file.sweep.max_gpu_in_flight)
