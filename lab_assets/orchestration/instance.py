"""The Dagster instance the lab drives: where it lives, its run queue, and its pool limits.

`lab` keeps a local instance under `$DAGSTER_HOME` (default `./.dagster_home`). The
`dagster.yaml` it writes turns on Dagster's own run queue: runs are queued, and the
daemon launches them as pool slots free up (`concurrency.pools.granularity: run`, so a
run waits in the queue, not in a process, for its slot). A `dagster.yaml` that `lab`
did not write (a team instance on Postgres, say) is never touched.

Pools: a GPU step (`adapter`) claims a slot of `gpu` on GCE (limit: the experiment's
GPU quota, `sweep.max_gpu_in_flight`) or of `cpu` locally (limit: the machine's cores,
or `sweep.max_local_in_flight`). The limits are set whenever the definitions load
and whenever `lab` submits work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dagster import DagsterInstance

from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.schema import GceCompute
from lab_assets.names import CPU_POOL, GPU_POOL

DEFAULT_DAGSTER_HOME = ".dagster_home"
_MARK = "# Written by `lab`."
DAGSTER_YAML = f"""\
{_MARK} Local run/event storage (SQLite) under this directory, Dagster's run queue,
# and run-level pools (a queued run waits for its pool's slot before it is launched).
# Remove the first line to keep `lab` from rewriting this file.
telemetry:
  enabled: false
run_queue:
  dequeue_interval_seconds: 1
  dequeue_use_threads: true
concurrency:
  runs:
    max_concurrent_runs: -1
  pools:
    granularity: run
# Each run's worker is forked from a process with dagster, torch & co imported.
run_launcher:
  module: lab_assets.orchestration.run_launcher
  class: WarmRunLauncher
# The daemon marks a run failed when its worker is gone (never left STARTED).
run_monitoring:
  enabled: true
  poll_interval_seconds: 5
"""


def ensure_dagster_home() -> Path:
    """`$DAGSTER_HOME` (default ./.dagster_home), with the lab's dagster.yaml if it has none."""
    home = Path(os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    current = cfg.read_text() if cfg.exists() else None
    if current is None or (current.startswith(_MARK) and current != DAGSTER_YAML):
        cfg.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def pool_for(exp: Experiment) -> str:
    """The pool an experiment's training steps claim: `gpu` on GCE, `cpu` locally."""
    return GPU_POOL if isinstance(exp.file.compute, GceCompute) else CPU_POOL


def pool_limit(exp: Experiment) -> int:
    if isinstance(exp.file.compute, GceCompute):
        return exp.file.sweep.max_gpu_in_flight
    return exp.file.sweep.max_local_in_flight or max(1, os.cpu_count() or 1)


def set_pool_limits(instance: DagsterInstance, exp: Experiment) -> None:
    """Cap concurrent training steps at the experiment's quota (GPUs, or local cores).

    Written only when it differs: definitions load in every run process, and a write
    per load would contend for the instance's database with the runs beside it.
    """
    storage, pool, limit = instance.event_log_storage, pool_for(exp), pool_limit(exp)
    if storage.get_concurrency_info(pool).slot_count != limit:
        storage.set_concurrency_slots(pool, limit)


def apply_pool_limits(exp: Experiment, attempts: int = 5, retry_s: float = 1.0) -> None:
    """When definitions load under a `$DAGSTER_HOME` (dagster dev, the daemon, a run): set limits.

    So a backfill launched from the UI respects the quota too, whoever started Dagster.
    """
    if not os.environ.get("DAGSTER_HOME"):
        return
    for attempt in range(1, attempts + 1):
        try:
            with DagsterInstance.get() as instance:
                set_pool_limits(instance, exp)
            return
        except Exception as e:  # read-only or unreachable: must not stop the code location
            # `dagster dev` on a new $DAGSTER_HOME: its processes create the SQLite
            # storage at once, and one of them loses that race; a moment later it works.
            if attempt == attempts:
                import warnings

                warnings.warn(f"lab: could not set pool limits on $DAGSTER_HOME: {e}", stacklevel=2)
            else:
                time.sleep(retry_s)
