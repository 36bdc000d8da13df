"""Jobs: the three asset jobs a partition's run goes through.

Rebuilding what is missing or stale is declarative automation (``automation.py``,
``schedules.py``), not a job: no op launches runs.
"""

from dagster import AssetKey, AssetSelection, define_asset_job

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
)


def asset_jobs(exp: Experiment) -> list:
    def keys(*names: str) -> AssetSelection:
        return AssetSelection.assets(*(AssetKey(exp.key_path(n)) for n in names))

    return [
        define_asset_job(
            BASE_MODELS_JOB,
            keys(BASE_MODEL, BASE_SPECTRUM),
            description="Build or fetch one base model and its spectrum.",
        ),
        define_asset_job(
            ADAPTERS_JOB,
            keys(ADAPTER, SPECTRAL_FEATURES),
            description="Train one adapter and measure its spectral features.",
        ),
        define_asset_job(
            CLASSIFICATION_JOB,
            keys(CLASSIFICATION),
            description="Classify method and task from every adapter's features.",
        ),
    ]
