"""Jobs: the three asset jobs a partition's run goes through, and the sweep job.

`sweep_job` materialises exactly the missing or stale partitions, in dependency
order, one Dagster run per partition (each tagged with why it was launched).
"""

from dagster import (
    AssetSelection,
    JobDefinition,
    OpExecutionContext,
    define_asset_job,
    job,
    op,
)

from lab_assets.experiment.resolved import Experiment
from lab_assets.names import (
    ADAPTER,
    ADAPTERS_JOB,
    BASE_MODEL,
    BASE_MODELS_JOB,
    BASE_SPECTRUM,
    CLASSIFICATION,
    CLASSIFICATION_JOB,
    SPECTRAL_FEATURES,
    SWEEP_JOB,
)
from lab_assets.orchestration.instance import set_gpu_pool_limit
from lab_assets.orchestration.runner import run_planned
from lab_assets.orchestration.sweep import assess, plan_sweep


def asset_jobs() -> list:
    return [
        define_asset_job(
            BASE_MODELS_JOB,
            AssetSelection.assets(BASE_MODEL, BASE_SPECTRUM),
            description="Build or fetch one base model and its spectrum.",
        ),
        define_asset_job(
            ADAPTERS_JOB,
            AssetSelection.assets(ADAPTER, SPECTRAL_FEATURES),
            description="Train one adapter and measure its spectral features.",
        ),
        define_asset_job(
            CLASSIFICATION_JOB,
            AssetSelection.assets(CLASSIFICATION),
            description="Classify method and task from every adapter's features.",
        ),
    ]


def build_sweep_job(exp: Experiment) -> JobDefinition:
    @op(required_resource_keys={"lab_storage"})
    def sweep(context: OpExecutionContext) -> None:
        store = context.resources.lab_storage.store
        plan = plan_sweep(exp, assess(exp, context.instance, store))
        if not plan:
            context.log.info("nothing missing or stale: no runs launched")
            return
        set_gpu_pool_limit(context.instance, exp)
        context.log.info(f"sweep: {len(plan)} runs")
        for planned in plan:
            context.log.info(f"launching {planned.label}: {planned.reason}")
            outcome = run_planned(context.instance, exp, planned)
            context.log.info(f"{planned.label}: run {outcome.run_id} ok in {outcome.seconds:.1f}s")

    @job(name=SWEEP_JOB, description="Materialise exactly the missing or stale partitions.")
    def sweep_job():
        sweep()

    return sweep_job
