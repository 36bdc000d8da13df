"""The sweep schedule: a `sweep_job` run on the experiment's cron, only when there is work.

The schedule exists when the experiment file gives `sweep.cron`. It requests a run
only when something is missing or stale, says what in the run's tags, and skips
while an earlier sweep is still running.
"""

from __future__ import annotations

from dagster import (
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    SkipReason,
    schedule,
)

from lab_assets.experiment.resolved import Experiment, digest
from lab_assets.names import SWEEP_JOB, SWEEP_PLAN_TAG, SWEEP_RUNS_TAG, SWEEP_SCHEDULE
from lab_assets.orchestration.sweep import assess, plan_sweep
from resources.io_manager import LabStorage

_ACTIVE = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


def build_sweep_schedule(exp: Experiment, storage: LabStorage) -> ScheduleDefinition | None:
    spec = exp.file.sweep
    if spec.cron is None:
        return None

    @schedule(
        name=SWEEP_SCHEDULE,
        cron_schedule=spec.cron,
        execution_timezone=spec.timezone,
        job_name=SWEEP_JOB,
        default_status=DefaultScheduleStatus.RUNNING,
        description="Runs sweep_job when something is missing or stale.",
    )
    def sweep_schedule(context):
        active = context.instance.get_runs(
            RunsFilter(job_name=SWEEP_JOB, statuses=_ACTIVE), limit=1
        )
        if active:
            return SkipReason(f"sweep run {active[0].run_id} is still in progress")
        plan = plan_sweep(exp, assess(exp, context.instance, storage.store))
        if not plan:
            return SkipReason("nothing missing or stale")
        return RunRequest(
            run_key=f"sweep-{digest([(p.job, p.partition, p.reason) for p in plan])}",
            tags={
                SWEEP_RUNS_TAG: str(len(plan)),
                SWEEP_PLAN_TAG: "; ".join(p.label for p in plan)[:4000],
            },
        )

    return sweep_schedule
