"""Sensors: recording what storage holds, and reaping forgotten GCE VMs.

The reconcile sensor records complete partitions that storage holds and this
Dagster instance does not know (manifest present, fingerprint read from it), so a
fresh instance recomputes nothing.

For experiments whose compute is ``gce``, every few minutes the reaper lists the project's lab VMs of this experiment and deletes
those whose Dagster run has ended (the launcher should have deleted them: an
orchestrator was killed mid-step), those kept with ``keep_vm`` past their time,
and those older than ``compute.reap_after_s``. It never requests runs; each tick
says what it did in its skip reason (visible on the sensor's page).
"""

from __future__ import annotations

from dagster import (
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from lab_assets.defs.resources import gce_compute
from lab_assets.experiment.resolved import Experiment
from lab_assets.names import REAPER_SENSOR, RECONCILE_SENSOR
from lab_assets.orchestration.sweep import reconcile_events
from resources.io_manager import LabStorage


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
            f"Deletes {exp.name}'s GCE VMs whose run has ended, kept VMs past their time, "
            f"and VMs older than {c.reap_after / 3600:.1f} h."
        ),
    )
    def gce_vm_reaper(context: SensorEvaluationContext):
        from resources.compute.gce.api import ComputeApi
        from resources.compute.gce.reaper import dagster_run_status, judge, list_lab_vms, reap

        api = ComputeApi(c.project)
        status = dagster_run_status(context.instance)
        verdicts = [judge(vm, status, c.reap_after) for vm in list_lab_vms(api, exp.name)]
        done = reap(api, verdicts, log=context.log.info)
        kept = len(verdicts) - len(done)
        return SkipReason(
            f"{len(verdicts)} lab VM(s): deleted {len(done)}"
            + "".join(f"\n- {v.vm.name}: {v.reason}" for v in done)
            + f"\nleft {kept}"
        )

    return gce_vm_reaper
