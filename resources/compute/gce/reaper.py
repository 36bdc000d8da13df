"""Finding and deleting lab VMs that outlived their purpose, judged by their agents' life signs.

Every lab VM carries ``lab-managed=true`` and the labels ``experiment``, ``run``
(the Dagster run that created it), ``partition``, ``step``. Its agent rewrites a life
record, ``<staging>/_gce/vms/<vm>.json`` (``resources.remote.agent_warm``): its
state (working, idle, done, retiring), a heartbeat time, its idle-until and deadline.
A VM is reaped when:

- it is older than the age limit (``reap_after_s``, default maxRunDuration + 10 min), or
  past the deadline its agent reports;
- it was kept on purpose (``keep_vm``: label ``lab-keep-until``) and that time has
  passed (a kept VM is otherwise left alone);
- its agent's heartbeat is stale (older than ``heartbeat_timeout_s``), or it never
  wrote a life record within ``boot_timeout_s`` of its creation;
- it is idle past its idle time, or it said it was retiring and is still there (it
  could not delete itself).

Never because its Dagster run ended: a step runs to its end and commits even when the
orchestrator that launched it is gone (the run then shows FAILURE or stays STARTED),
and a warm VM outlives the run that created it. The run status is shown, not used.
The dead-man switch (``maxRunDuration``) deletes every VM eventually; the reaper makes
"eventually" sooner. Used by ``lab vms`` and the sensor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from resources.compute.gce.api import ComputeApi
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.settings import LaunchSettings
from resources.compute.gce.vm_spec import KEEP_UNTIL_LABEL, MANAGED_LABEL, label_value
from resources.remote.protocol import VM_IDLE, VM_RETIRING, VMS_DIR


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


@dataclass(frozen=True)
class LifeRules:
    """How stale a life record may get (the launch settings' own timings)."""

    heartbeat_timeout_s: float = 180.0
    boot_timeout_s: float = 1200.0
    grace_s: float = 60.0  # slack past an idle time or a "retiring" before the reaper acts

    @classmethod
    def of(cls, s: LaunchSettings) -> LifeRules:
        return cls(s.heartbeat_timeout_s, s.boot_timeout_s, max(60.0, 3 * s.heartbeat_s))


def judge(
    vm: LabVm,
    run_status: Callable[[str], str | None],
    max_age_s: float,
    now: float | None = None,
    life: dict | None = None,
    rules: LifeRules = LifeRules(),
) -> Verdict:
    """Whether to reap `vm`, and why. `run_status(run_id)`: the run's status name, or None
    (shown, never used); `life`: the VM's life record, None when it has none."""
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
    if life is None:
        if age < rules.boot_timeout_s + rules.grace_s:
            return Verdict(vm, False, f"booting ({age:.0f}s old, no life record yet)", status)
        return Verdict(
            vm, True, f"no life signs from its agent in {age / 60:.0f} min since creation", status
        )
    state = str(life.get("state", "?"))
    quiet = now - float(life.get("t", 0))
    deadline = life.get("deadline")
    if deadline and now > float(deadline):
        return Verdict(vm, True, "past its deadline (maxRunDuration)", status)
    if state == VM_RETIRING and quiet > rules.grace_s:
        why = life.get("why") or "?"
        return Verdict(vm, True, f"retiring ({why}) but could not delete itself", status)
    if quiet > rules.heartbeat_timeout_s:
        return Verdict(vm, True, f"its agent's heartbeat is stale ({quiet:.0f}s, {state})", status)
    idle_until = life.get("idle_until")
    if state == VM_IDLE and idle_until and now > float(idle_until) + rules.grace_s:
        late = now - float(idle_until)
        return Verdict(vm, True, f"idle past its idle time ({late:.0f}s over)", status)
    if state == VM_IDLE and idle_until:
        return Verdict(
            vm, False, f"agent alive: idle for {float(idle_until) - now:.0f}s more", status
        )
    what = f"{life.get('launch', '')} attempt {life.get('attempt')}" if life.get("launch") else ""
    return Verdict(vm, False, f"agent alive: {state} {what}".rstrip(), status)


def life_records(gcs: Gcs, staging: str, names: Iterable[str]) -> dict[str, dict]:
    """The life records of the VMs `names` (those that have one)."""
    out = {}
    for name in names:
        rec = gcs.read_json(f"{staging.rstrip('/')}/{VMS_DIR}/{name}.json")
        if rec is not None:
            out[name] = rec
    return out


def judge_all(
    api: ComputeApi,
    gcs: Gcs,
    s: LaunchSettings,
    run_status: Callable[[str], str | None],
    max_age_s: float | None = None,
) -> list[Verdict]:
    """Every lab VM of the experiment, judged by its life signs."""
    vms = list_lab_vms(api, s.experiment)
    lives = life_records(gcs, s.staging, [v.name for v in vms])
    rules = LifeRules.of(s)
    limit = s.reap_after if max_age_s is None else max_age_s
    return [judge(v, run_status, limit, life=lives.get(v.name), rules=rules) for v in vms]


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
        except Exception:  # noqa: BLE001 - shown only
            return None
        return None if run is None else run.status.value

    return status
