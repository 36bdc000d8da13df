"""Sensors: the reaper of forgotten GCE VMs, for experiments whose compute is ``gce``.

Every few minutes it lists the project's lab VMs of this experiment and deletes
those whose Dagster run has ended (the launcher should have deleted them: an
orchestrator was killed mid-step), those kept with ``keep_vm`` past their time,
and those older than ``compute.reap_after_s``. It never requests runs; each tick
says what it did in its skip reason (visible on the sensor's page).
"""

from __future__ import annotations

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason, sensor

from lab_assets.compute import gce_compute
from lab_assets.config import Experiment

REAPER_SENSOR = "gce_vm_reaper"


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
        from resources.gce.api import ComputeApi
        from resources.gce.reaper import dagster_run_status, judge, list_lab_vms, reap

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
