"""Sensors: what is stale and why, recording what storage holds, reaping forgotten GCE VMs.

The staleness sensor (on by default, every 30 s) compares every partition's recorded
recipe with the one the experiment file and code expect now (`sweep.assess`) and,
when a partition's verdict changes, records an `AssetObservation` on it with
`lab/state` (missing, stale, or fresh again) and `lab/why` (e.g. `learning_rate 0.001
→ 0.005`, `input adapter[…] changed`): the asset's Events and the partition's page
in the UI show which partitions are stale and why. Its cursor holds the verdicts, so
an unchanged experiment records nothing.

The reconcile sensor records complete partitions that storage holds and this
Dagster instance does not know (manifest present, fingerprint read from it), so a
fresh instance recomputes nothing.

For experiments whose compute is ``gce``, every few minutes the reaper lists the project's lab VMs of this experiment and deletes
them by their agents' life signs: a stale heartbeat, idle past its idle time, kept
with ``keep_vm`` past its time, past its deadline or older than
``compute.reap_after_s`` (never because its Dagster run ended: a step runs on
without its orchestrator). It never requests runs; each tick
says what it did in its skip reason (visible on the sensor's page).
"""

from __future__ import annotations

import json

from dagster import (
    AssetObservation,
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from lab_assets.defs.resources import gce_compute, gce_settings
from lab_assets.experiment.resolved import Experiment
from lab_assets.names import REAPER_SENSOR, RECONCILE_SENSOR, STALENESS_SENSOR
from lab_assets.orchestration.sweep import FRESH, PartitionStatus, assess, reconcile_events
from resources.io_manager import LabStorage


def build_staleness_sensor(
    exp: Experiment, storage: LabStorage, interval_s: int = 30
) -> SensorDefinition:
    @sensor(
        name=STALENESS_SENSOR,
        minimum_interval_seconds=interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "Records, as observations on each partition, which partitions are missing or "
            "stale and why (`lab/state`, `lab/why`), whenever that changes."
        ),
    )
    def lab_staleness(context: SensorEvaluationContext):
        statuses = assess(exp, context.instance, storage.store)
        events, verdicts = staleness_events(
            statuses, json.loads(context.cursor or "{}"), exp.asset_prefix
        )
        for e in events:
            context.log.info(f"{e.asset_key.to_user_string()}[{e.partition}]: {_why(e)}")
        if not events:
            n = sum(1 for v in verdicts.values() if v[0] != FRESH)
            return SkipReason(f"no change: {n} partition(s) missing or stale")
        return SensorResult(asset_events=events, cursor=json.dumps(verdicts, sort_keys=True))

    return lab_staleness


def staleness_events(
    statuses: list[PartitionStatus], previous: dict[str, list], prefix: tuple[str, ...] = ()
) -> tuple[list[AssetObservation], dict[str, list]]:
    """Observations for partitions whose verdict changed, and the verdicts now (not fresh)."""
    verdicts = {s.ref: [s.state, list(s.reasons)] for s in statuses if s.state != FRESH}
    events = []
    for s in statuses:
        now = verdicts.get(s.ref)
        if now == previous.get(s.ref) or (now is None and s.ref not in previous):
            continue
        why = "; ".join(s.reasons) if s.reasons else "matches its recipe again"
        events.append(
            AssetObservation(
                asset_key=[*prefix, s.asset],
                partition=s.partition,
                description=f"{s.state}: {why}",
                metadata={"lab/state": s.state, "lab/why": why},
            )
        )
    return events, verdicts


def _why(e: AssetObservation) -> str:
    return str(e.description)


def build_reconcile_sensor(exp: Experiment, storage: LabStorage) -> SensorDefinition:
    @sensor(
        name=RECONCILE_SENSOR,
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


def build_vm_reaper_sensor(exp: Experiment, interval_s: int = 300):
    c = gce_compute(exp)

    @sensor(
        name=REAPER_SENSOR,
        minimum_interval_seconds=interval_s,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            f"Deletes {exp.name}'s GCE VMs whose agent's heartbeat is stale, idle VMs past "
            f"their idle time, kept VMs past their time, and VMs older than "
            f"{c.reap_after / 3600:.1f} h."
        ),
    )
    def gce_vm_reaper(context: SensorEvaluationContext):
        from resources.compute.gce.api import ComputeApi
        from resources.compute.gce.gcs import Gcs
        from resources.compute.gce.reaper import dagster_run_status, judge_all, reap

        if exp.placeholders:  # a project like ${GCP_PROJECT:-…} not set: nothing to reap
            return SkipReason(f"set {', '.join(exp.placeholders)} first (placeholders in use)")
        api = ComputeApi(c.project)
        status = dagster_run_status(context.instance)
        verdicts = judge_all(api, Gcs(), gce_settings(exp), status, c.reap_after)
        done = reap(api, verdicts, log=context.log.info)
        kept = len(verdicts) - len(done)
        return SkipReason(
            f"{len(verdicts)} lab VM(s): deleted {len(done)}"
            + "".join(f"\n- {v.vm.name}: {v.reason}" for v in done)
            + f"\nleft {kept}"
        )

    return gce_vm_reaper
