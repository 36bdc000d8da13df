"""The sweep as Dagster sees it: `sweep_job`, its cron schedule, and the reconcile sensor.

`sweep_job` materialises exactly the missing or stale partitions, in dependency
order, one Dagster run per partition (tagged with why). The schedule (when the
experiment file gives `sweep.cron`) requests a `sweep_job` run only when there is
something to do, and says what in the run's tags. The reconcile sensor records
what storage already holds, so a fresh Dagster instance recomputes nothing.
"""

from dagster import (
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    JobDefinition,
    OpExecutionContext,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    SensorDefinition,
    SensorResult,
    SkipReason,
    job,
    op,
    schedule,
    sensor,
)

from lab_assets.config import Experiment, digest
from lab_assets.sweep import GPU_POOL, assess, plan_sweep, reconcile_events
from resources.io_manager import LabStorage

SWEEP_JOB = "sweep_job"
_ACTIVE = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


def set_gpu_pool_limit(instance, exp: Experiment) -> None:
    """Cap concurrent GPU steps (the `gpu` pool) at the experiment's GPU quota."""
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, exp.file.sweep.max_gpu_in_flight)


def build_sweep_job(exp: Experiment) -> JobDefinition:
    @op(required_resource_keys={"lab_storage"})
    def sweep(context: OpExecutionContext) -> None:
        from lab_assets.runner import run_planned

        store = context.resources.lab_storage.store
        plan = plan_sweep(exp, assess(exp, context.instance, store))
        if not plan:
            context.log.info("nothing missing or stale: no runs launched")
            return
        set_gpu_pool_limit(context.instance, exp)
        context.log.info(f"sweep: {len(plan)} runs")
        for planned in plan:
            context.log.info(f"launching {planned.label}: {planned.reason}")
            outcome = run_planned(context.instance, planned)
            context.log.info(f"{planned.label}: run {outcome.run_id} ok in {outcome.seconds:.1f}s")

    @job(name=SWEEP_JOB, description="Materialise exactly the missing or stale partitions.")
    def sweep_job():
        sweep()

    return sweep_job


def build_sweep_schedule(exp: Experiment, storage: LabStorage) -> ScheduleDefinition | None:
    spec = exp.file.sweep
    if spec.cron is None:
        return None

    @schedule(
        name="sweep_schedule",
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
                "lab/sweep_runs": str(len(plan)),
                "lab/sweep_plan": "; ".join(p.label for p in plan)[:4000],
            },
        )

    return sweep_schedule


def build_reconcile_sensor(exp: Experiment, storage: LabStorage) -> SensorDefinition:
    @sensor(
        name="reconcile_from_storage",
        minimum_interval_seconds=300,
        default_status=DefaultSensorStatus.RUNNING,
        description="Records complete partitions in storage that this Dagster instance lacks.",
    )
    def reconcile_from_storage(context):
        events = reconcile_events(exp, context.instance, storage.store)
        if not events:
            return SkipReason("storage and this instance agree")
        return SensorResult(asset_events=events)

    return reconcile_from_storage
