"""The rebuild: Dagster's automation sensor over the five assets (the scheduled sweep too).

Every asset carries `automation.rebuild_condition` ("missing or stale by the lab's
recipe, not in progress, inputs settled"). This sensor evaluates it, in the code
server (the condition reads storage manifests) and launches what it selects, most
upstream first, dependents on later ticks. No op launches runs.

Without `sweep.cron` the sensor is defined but STOPPED: switching it on in the UI
(Automation → `rebuild_stale_and_missing`) is the one action that rebuilds exactly
the stale and missing partitions, and keeps them so while it is on. With
`sweep.cron` the condition also waits for a cron tick, and the sensor starts
RUNNING: that is the scheduled sweep.
"""

from __future__ import annotations

import warnings

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationConditionSensorDefinition,
    BetaWarning,
    DefaultSensorStatus,
)

from lab_assets.experiment.resolved import Experiment
from lab_assets.names import (
    ADAPTER,
    BASE_MODEL,
    BASE_SPECTRUM,
    CLASSIFICATION,
    REASON_TAG,
    REBUILD_SENSOR,
    SPECTRAL_FEATURES,
)


def build_rebuild_sensor(
    exp: Experiment, minimum_interval_seconds: int = 30
) -> AutomationConditionSensorDefinition:
    cron = exp.file.sweep.cron
    when = f"after each tick of `{cron}` ({exp.file.sweep.timezone})" if cron else "while on"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)  # use_user_code_server is beta in 1.13
        return _sensor(exp, when, minimum_interval_seconds)


def _sensor(exp: Experiment, when: str, interval_s: int) -> AutomationConditionSensorDefinition:
    cron = exp.file.sweep.cron
    return AutomationConditionSensorDefinition(
        REBUILD_SENSOR,
        target=AssetSelection.assets(
            *(
                AssetKey(exp.key_path(n))
                for n in (BASE_MODEL, BASE_SPECTRUM, ADAPTER, SPECTRAL_FEATURES, CLASSIFICATION)
            )
        ),
        default_status=DefaultSensorStatus.RUNNING if cron else DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=interval_s,
        use_user_code_server=True,
        emit_backfills=True,
        run_tags={REASON_TAG: "automation: missing or stale"},
        description=(
            f"Rebuilds exactly the missing or stale partitions of {exp.name} {when}, "
            "never one already in progress; each partition's `lab/why` observation says "
            "why it is stale."
        ),
    )
