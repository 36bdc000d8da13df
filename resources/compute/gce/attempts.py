"""One step's VMs, one after another: create, follow, delete, and again after a preemption.

Each attempt creates a VM (the first placement with capacity, after the budget
check, with a worst-case reservation in the cost ledger), follows it until the step
ends (``follow``), then deletes it and settles its cost, whatever the ending. A
spot preemption starts the next attempt on a new VM, the preempted zone tried
last, up to ``max_preemptions`` times; the step resumes there from its checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dagster._core.events import DagsterEvent
from dagster._core.execution.context.system import StepExecutionContext
from dagster._utils.interrupts import capture_interrupts

from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.costs import CostLedger, PriceMissing, check_budget
from resources.compute.gce.errors import GceApiError
from resources.compute.gce.follow import ENDED, VmFollower
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.placement import Placement, create_with_failover
from resources.compute.gce.record import LaunchRecord, Vm
from resources.compute.gce.settings import LaunchSettings
from resources.compute.gce.step_vm import build_vm_spec, image_for, safe_step_key

if TYPE_CHECKING:
    from resources.compute.gce.api import ComputeApi


class TooManyPreemptions(RuntimeError):
    pass


def check_launch_budget(
    s: LaunchSettings, ledger: CostLedger, placement: Placement, log
) -> float | None:
    """The VM's hourly price (None without one) once spent + its worst case fit the budget."""
    try:
        price = s.price(placement)
    except PriceMissing as e:
        if s.budget_usd > 0:
            raise PriceMissing(f"{e}; a budget is set, so every VM needs a price") from None
        log.warning(f"{e}: VM cost will not be recorded")
        return None
    worst = price * s.max_run_duration_s / 3600
    spent = ledger.spent() if s.budget_usd > 0 else 0.0
    check_budget(
        s.budget_usd,
        spent,
        worst,
        f"${price:.3f}/h x {s.max_run_duration_s / 3600:.2f} h maxRunDuration, "
        f"{placement.machine_type} + {placement.gpu_count} x {placement.gpu_type}",
    )
    return price


@dataclass
class StepAttempts:
    """The VMs of one launched step; ``run()`` relays its events until the step ends."""

    settings: LaunchSettings
    api: ComputeApi
    gcs: Gcs
    ledger: CostLedger
    step_context: StepExecutionContext
    record: LaunchRecord
    launch_uri: str
    run_id: str
    step_key: str
    partition: str | None

    @property
    def log(self):
        return self.step_context.log

    def run(self) -> Generator[DagsterEvent, None, None]:
        s, record = self.settings, self.record
        avoid: tuple[str, ...] = ()
        attempt = 0
        while True:
            attempt += 1
            vm = self._create_vm(attempt, avoid)
            try:
                follower = VmFollower(
                    s, self.api, self.gcs, self.step_context, record, vm, self.launch_uri
                )
                outcome = yield from follower.follow()
            finally:
                self._end_vm(vm)
            if outcome == ENDED:
                return
            record.preemptions += 1
            if record.preemptions > s.max_preemptions:
                raise TooManyPreemptions(
                    f"{self.step_key}: preempted {record.preemptions} times "
                    f"(max_preemptions {s.max_preemptions}); giving up"
                )
            self.log.warning(
                f"VM {vm.name} in {vm.zone} was preempted ({record.preemptions}/"
                f"{s.max_preemptions}); resuming from the last checkpoint on a new VM"
            )
            avoid = (vm.zone,)

    def _ledger_key(self, attempt: int) -> str:
        return f"{self.run_id}.{safe_step_key(self.step_key)}.a{attempt}"

    def _create_vm(self, attempt: int, avoid: tuple[str, ...]) -> Vm:
        s = self.settings
        name = vmbody.vm_name(s.experiment, self.run_id, self.step_key, attempt)
        source_image, prebaked = image_for(self.api, s)
        if not prebaked:
            self.log.warning(
                f"no image in family {s.image_family!r} (project {s.image_project or s.project}); "
                f"booting {source_image} with the bootstrap (slow: build one with `lab image build`)"
            )
        prices: dict[Placement, float | None] = {}

        def create(p: Placement) -> None:
            prices[p] = self._insert(p, name, source_image, prebaked, attempt)

        self.log.info(f"creating VM {name} (attempt {attempt})")
        result = create_with_failover(s.placements(avoid), create, self.log.warning)
        self.record.failovers += [p.zone for p, _ in result.failures]
        p = result.placement
        vm = Vm(name, p, attempt, prices.get(p), time.time())
        self.record.vms.append(vm)
        self.log.info(
            f"VM {name} created in {p.zone}: {p.machine_type} + {p.gpu_count} x {p.gpu_type}, "
            f"{'spot' if s.spot else 'on-demand'}, maxRunDuration {s.max_run_duration_s}s"
        )
        return vm

    def _insert(
        self, p: Placement, name: str, source_image: str, prebaked: bool, attempt: int
    ) -> float | None:
        """Create the VM at `p` and reserve its worst case; its hourly price (None: unknown)."""
        s = self.settings
        price = check_launch_budget(s, self.ledger, p, self.log)
        spec = build_vm_spec(
            s,
            placement=p,
            name=name,
            source_image=source_image,
            prebaked=prebaked,
            launch_uri=self.launch_uri,
            attempt=attempt,
            run_id=self.run_id,
            step_key=self.step_key,
            partition=self.partition,
            launch_info=self._launch_info(p, name, price),
        )
        try:
            self.api.insert_instance(p.zone, vmbody.build_instance(spec))
        except GceApiError as e:
            if e.accepted or e.code == "TIMEOUT":  # the VM may exist: record it, delete it
                self._record_unfinished(p, name, attempt, price)
                self._delete_unfinished(p.zone, name)
            raise  # otherwise GCE answered: no VM (stockout, quota, bad request)
        except BaseException:  # interrupted mid-insert (Ctrl-C, terminate): it may exist
            self._delete_unfinished(p.zone, name)
            raise
        if price is None:
            return None
        try:
            self.ledger.reserve(
                self._ledger_key(attempt),
                price * s.max_run_duration_s / 3600,
                vm=name,
                zone=p.zone,
                run_id=self.run_id,
                step_key=self.step_key,
            )
        except BaseException:
            self.api.delete_instance(p.zone, name)  # not tracked yet: do not leak it
            raise
        return price

    def _record_unfinished(self, p: Placement, name: str, attempt: int, price: float | None):
        """A VM whose insert was accepted but not seen through: in the launch record (it shows
        in the step's metadata and log), ended now, so that it is accounted for."""
        now = time.time()
        vm = Vm(name, p, attempt, price, now)
        vm.ended_at = now
        self.record.vms.append(vm)
        self.log.warning(
            f"VM {name} in {p.zone}: insert accepted but not confirmed; deleting it so that "
            "it cannot run unwatched"
        )

    def _delete_unfinished(self, zone: str, name: str) -> None:
        """Delete a VM whose insert did not finish (it may or may not exist); never raises,
        and a second interrupt cannot break it off."""
        with capture_interrupts():
            try:
                if self.api.delete_instance(zone, name, wait=False):
                    self.log.warning(f"VM {name}: insert interrupted; deleted what it created")
            except Exception as e:  # noqa: BLE001 - the reaper sweeps what this misses
                self.log.warning(f"VM {name}: insert interrupted and delete failed ({e})")

    def _launch_info(self, p: Placement, name: str, price: float | None) -> dict[str, Any]:
        """What the step, on the VM, is told about the VM (``resources.remote.launch_info``)."""
        return {
            "vm_name": name,
            "zone": p.zone,
            "machine_type": p.machine_type,
            "gpu_type": p.gpu_type,
            "gpu_count": p.gpu_count,
            "spot": self.settings.spot,
            "hourly_usd": price,
            "preemptions": self.record.preemptions,
            "previous_vm_seconds": self.record.vm_seconds,
            "previous_cost_usd": self.record.cost or 0.0,
            "vm_started_at": time.time(),
        }

    def _end_vm(self, vm: Vm) -> None:
        """Delete the VM (unless ``keep_vm``) and settle its cost in the ledger."""
        vm.ended_at = time.time()
        # A cancel may come twice (lab and the daemon both terminate a run): the second
        # must not break off the delete of the VM or the settling of its cost.
        with capture_interrupts():
            self._delete_and_settle(vm)

    def _delete_and_settle(self, vm: Vm) -> None:
        s = self.settings
        try:
            if s.keep_vm:
                self.log.warning(
                    f"keep_vm: VM {vm.name} left running; connect with: gcloud compute ssh "
                    f"{vm.name} --zone {vm.zone} --project {s.project} (the reaper deletes it "
                    f"after {s.keep_vm_hours} h, maxRunDuration after {s.max_run_duration_s}s)"
                )
            else:
                self.api.delete_instance(vm.zone, vm.name)
                vm.ended_at = time.time()
                self.log.info(f"VM {vm.name} deleted ({vm.seconds:.0f} VM-seconds)")
        finally:
            if vm.hourly_usd is not None:
                self.ledger.settle(
                    self._ledger_key(vm.attempt),
                    vm.cost or 0.0,
                    vm.seconds,
                    vm=vm.name,
                    zone=vm.zone,
                    run_id=self.run_id,
                    step_key=self.step_key,
                )
