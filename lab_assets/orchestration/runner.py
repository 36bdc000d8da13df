"""One planned run executed in this process, bypassing the run queue (tests, debugging).

Every materialisation the lab drives goes through Dagster's run queue as a backfill
(`lab_assets.orchestration.engine`). This module keeps the shape of a planned run
(`PlannedRun`, which `sweep.plan_sweep` returns to say what a sweep would do) and
`run_planned`, which executes one such run in-process with `execute_job`: the tests
use it to rebuild a few partitions without starting a daemon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dagster import AssetKey, DagsterInstance, build_reconstructable_job, execute_job
from dagster._core.definitions.reconstruct import ReconstructableJob

from lab_assets.experiment.resolved import Experiment
from lab_assets.names import REASON_TAG
from lab_assets.orchestration.watch import root_cause_message

# The job of an experiment is rebuilt in every process that runs one of its steps
# (a local worker, a VM) from the experiment's text: see `definitions.experiment_job`.
DEFINITIONS_MODULE = "lab_assets.definitions"
JOB_RECONSTRUCTOR = "experiment_job"
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass(frozen=True)
class PlannedRun:
    job: str
    partition: str | None
    label: str
    assets: tuple[str, ...] | None = None  # a subset of the job's assets; None: all of them
    reason: str = ""  # why the run was planned (a sweep says missing / what changed)


@dataclass
class RunOutcome:
    planned: PlannedRun
    run_id: str
    success: bool
    seconds: float


class RunFailed(RuntimeError):
    def __init__(self, outcome: RunOutcome, message: str):
        super().__init__(message)
        self.outcome = outcome


def reconstructable_job(exp: Experiment, job: str) -> ReconstructableJob:
    """`job` of `exp`, as a pointer any process can rebuild (the experiment travels as text)."""
    return build_reconstructable_job(
        DEFINITIONS_MODULE,
        JOB_RECONSTRUCTOR,
        reconstructable_args=(exp.text, str(exp.path), exp.storage_root, job, exp.asset_prefix),
    )


def run_planned(
    instance: DagsterInstance,
    exp: Experiment,
    planned: PlannedRun,
    run_config: dict | None = None,
) -> RunOutcome:
    """Execute one planned run; raises `RunFailed` with the step errors if it fails."""
    recon_job = reconstructable_job(exp, planned.job)
    job_def = recon_job.get_definition()
    selection = [AssetKey(exp.key_path(a)) for a in planned.assets] if planned.assets else None
    tags = dict(
        job_def.get_tags_for_partition_key(planned.partition, selected_asset_keys=selection)
        if planned.partition
        else {}
    )
    if planned.reason:
        tags[REASON_TAG] = planned.reason[:4000]
    t0 = time.perf_counter()
    result = execute_job(
        recon_job,
        instance=instance,
        asset_selection=selection,
        tags=tags,
        run_config=run_config if run_config is not None else QUIET_RUN_CONFIG,
        raise_on_error=False,
    )
    with result:
        outcome = RunOutcome(planned, result.run_id, result.success, time.perf_counter() - t0)
        if not result.success:
            errors = [
                f"{e.step_key}: {root_cause_message(e.step_failure_data.error)}"
                for e in result.all_events
                if e.is_step_failure and e.step_failure_data and e.step_failure_data.error
            ]
            raise RunFailed(
                outcome,
                f"{planned.label} failed (run {result.run_id}):\n  " + "\n  ".join(errors or ["?"]),
            )
    return outcome
