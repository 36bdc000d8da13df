"""Finding and deleting lab VMs that outlived their purpose.

Every lab VM carries ``lab-managed=true`` and the labels ``experiment``, ``run``
(the Dagster run id), ``partition``, ``step``. A VM is reaped when:

- it was kept on purpose (``keep_vm``: label ``lab-keep-until``) and that time has
  passed, or it is older than the age limit; a kept VM is otherwise left alone,
  even though its run has ended;
- otherwise, when its Dagster run has ended (SUCCESS, FAILURE, CANCELED): the
  launcher should have deleted it, so something went wrong (a killed orchestrator);
- or when it is older than the age limit, whatever its run says (a run this
  Dagster instance does not know is judged by age alone: it may belong to a
  colleague's instance).

The dead-man switch (``maxRunDuration``) deletes every VM eventually; the reaper
makes "eventually" sooner and covers kept VMs. Used by ``lab vms`` and the sensor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from resources.compute.gce.api import ComputeApi
from resources.compute.gce.vm_spec import KEEP_UNTIL_LABEL, MANAGED_LABEL, label_value

ENDED_RUN_STATUSES = frozenset({"SUCCESS", "FAILURE", "CANCELED"})


@dataclass(frozen=True)
class LabVm:
    name: str
    zone: str
    status: str
    created: float
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str | None:
        return self.labels.get("run")

    def age_s(self, now: float | None = None) -> float:
        return (now or time.time()) - self.created


@dataclass(frozen=True)
class Verdict:
    vm: LabVm
    reap: bool
    reason: str
    run_status: str | None


def _created(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def list_lab_vms(api: ComputeApi, experiment: str | None = None) -> list[LabVm]:
    """The lab's VMs (of `experiment`, matched by its label value as the insert body wrote it:
    ``qwen2.5-3b-lora`` is labelled ``qwen2_5-3b-lora``)."""
    labels = {MANAGED_LABEL: "true"}
    if experiment:
        labels["experiment"] = label_value(experiment)
    return sorted(
        (
            LabVm(
                inst.name, zone, inst.status, _created(inst.creation_timestamp), dict(inst.labels)
            )
            for zone, inst in api.list_instances(labels)
        ),
        key=lambda v: v.created,
    )


def judge(
    vm: LabVm,
    run_status: Callable[[str], str | None],
    max_age_s: float,
    now: float | None = None,
) -> Verdict:
    """Whether to reap `vm`, and why. `run_status(run_id)`: the run's status name, or None."""
    now = now or time.time()
    age = vm.age_s(now)
    status = run_status(vm.run_id) if vm.run_id else None
    keep_until = vm.labels.get(KEEP_UNTIL_LABEL)
    if age > max_age_s:
        return Verdict(
            vm, True, f"older than {max_age_s / 3600:.1f} h ({age / 3600:.1f} h)", status
        )
    if keep_until and keep_until.isdigit():
        if now >= int(keep_until):
            return Verdict(vm, True, "kept (keep_vm) past its keep-until time", status)
        left = (int(keep_until) - now) / 60
        return Verdict(vm, False, f"kept on purpose for {left:.0f} more min", status)
    if status in ENDED_RUN_STATUSES:
        return Verdict(vm, True, f"its run {vm.run_id} has ended ({status})", status)
    if status is None:
        return Verdict(vm, False, "run unknown to this Dagster instance; judged by age", status)
    return Verdict(vm, False, f"its run is {status}", status)


def reap(
    api: ComputeApi,
    verdicts: Iterable[Verdict],
    dry_run: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> list[Verdict]:
    """Delete every VM judged for reaping; returns those verdicts."""
    done = []
    for v in verdicts:
        if not v.reap:
            continue
        log(f"{'would delete' if dry_run else 'deleting'} {v.vm.name} ({v.vm.zone}): {v.reason}")
        if not dry_run:
            api.delete_instance(v.vm.zone, v.vm.name, wait=False)
        done.append(v)
    return done


def dagster_run_status(instance) -> Callable[[str], str | None]:
    """`run_status` backed by a Dagster instance."""

    def status(run_id: str) -> str | None:
        try:
            run = instance.get_run_by_id(run_id)
        except Exception:
            return None
        return None if run is None else run.status.value

    return status
