"""One step's VMs, one after another: create, follow, delete, and again after a preemption.

Each attempt creates a VM (the first placement with capacity, after the budget
check, with a worst-case reservation in the cost ledger), follows it until the step
ends (``follow``), then deletes it and settles its cost, whatever the ending. A
spot preemption starts the next attempt on a new VM, the preempted zone tried
last, up to ``max_preemptions`` times; the step resumes there from its checkpoints.
"""

from __future__ import annotations

import dataclasses
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
from resources.compute.gce.inflight import InflightIndex
from resources.compute.gce.placement import Placement, create_with_failover
from resources.compute.gce.record import BOOTED, REUSED, LaunchRecord, Vm
from resources.compute.gce.settings import LaunchSettings
from resources.compute.gce.step_vm import build_vm_spec, image_for, safe_step_key
from resources.compute.gce.warm import Offer, pickup_s, warm_block
from resources.compute.gce.warm import claim as claim_warm
from resources.remote.protocol import STATUS_FILE, attempt_prefix

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
    """The VMs of one launched step; ``run()`` relays its events until the step ends.

    ``attach``: the first attempt is a VM already running the launch (re-attached after
    the orchestrator that launched it was lost); ``first_attempt``: the attempt number
    the next VM takes (a resumed launch continues its numbering and checkpoints).
    With ``idle_minutes`` > 0 a warm VM of the step's ``shape`` is claimed before one
    is created, and the VM is left to the next step when this one ends."""

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
    shape: str = ""
    lease_id: str = ""
    index: InflightIndex | None = None
    index_key: str = ""
    first_attempt: int = 1
    attach: Vm | None = None

    @property
    def log(self):
        return self.step_context.log

    def run(self) -> Generator[DagsterEvent, None, None]:
        s, record = self.settings, self.record
        avoid: tuple[str, ...] = ()
        attempt = self.first_attempt - 1
        vm = self.attach
        while True:
            if vm is None:
                attempt += 1
                vm = self._get_vm(attempt, avoid)
            attempt = vm.attempt
            outcome = None
            try:
                follower = VmFollower(
                    s, self.api, self.gcs, self.step_context, record, vm, self.launch_uri
                )
                outcome = yield from follower.follow()
            finally:
                self._end_vm(vm, outcome)
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
            vm = None

    def _get_vm(self, attempt: int, avoid: tuple[str, ...]) -> Vm:
        """A warm VM of the step's shape if one is on offer, else a new one."""
        requested = time.time()
        vm = self._claim_warm(attempt) if self.settings.idle_minutes > 0 else None
        if vm is None:
            vm = self._create_vm(attempt, avoid)
        vm.requested_at = requested
        self._index_vm(vm)
        return vm

    def _index_vm(self, vm: Vm) -> None:
        """The in-flight index names the attempt's VM (what a re-run re-attaches to)."""
        self._index(
            vm.name,
            vm.placement,
            vm.attempt,
            vm.hourly_usd,
            vm.how,
            vm.started_at,
            created_at=vm.created_at,
            ledger_key=vm.ledger_key,
        )

    def _index(
        self,
        name: str,
        p: Placement,
        attempt: int,
        price: float | None,
        how: str,
        started_at: float,
        **more: Any,
    ) -> None:
        """Record in the index the VM an attempt is on. Called *before* the VM is handed the
        step (insert, claim) too: an orchestrator killed in between leaves an entry that
        names the VM that may run the step, so a re-run attaches to it instead of starting
        a second one."""
        if self.index is None:
            return
        self.index.update(
            self.index_key,
            self.lease_id,
            attempt=attempt,
            vm=name,
            zone=p.zone,
            machine_type=p.machine_type,
            gpu_type=p.gpu_type,
            gpu_count=p.gpu_count,
            hourly_usd=price,
            how=how,
            vm_started_at=started_at,
            **more,
        )

    def _claim_warm(self, attempt: int) -> Vm | None:
        def step_for(offer: Offer) -> dict[str, Any]:
            info = self._launch_info(offer.placement, offer.vm, offer.hourly_usd)
            info["vm"] = REUSED
            self._index(offer.vm, offer.placement, attempt, offer.hourly_usd, REUSED, time.time())
            return build_vm_spec(
                self.settings,
                placement=offer.placement,
                name=offer.vm,
                source_image="",
                prebaked=True,
                launch_uri=self.launch_uri,
                attempt=attempt,
                run_id=self.run_id,
                step_key=self.step_key,
                partition=self.partition,
                launch_info=info,
            ).instructions

        while True:
            offer = claim_warm(self.gcs, self.settings, self.shape, step_for, self.lease_id)
            if offer is None:
                return None
            if self._picked_up(offer, attempt):
                break
        now = time.time()
        vm = Vm(
            offer.vm,
            offer.placement,
            attempt,
            offer.hourly_usd,
            now,
            how=REUSED,
            created_at=offer.created_at,
            ledger_key=offer.ledger_key,
        )
        self.record.vms.append(vm)
        self.log.info(
            f"reusing warm VM {offer.vm} in {offer.placement.zone} (attempt {attempt}): "
            f"no boot; it was idle after an earlier step of the same shape"
        )
        return vm

    def _picked_up(self, offer: Offer, attempt: int) -> bool:
        """Whether the claimed VM started the step. One that does not within a few heartbeats
        (it died idle just before the claim) is deleted, so that it can never run the step
        late beside the VM that runs it instead."""
        s = self.settings
        status = f"{attempt_prefix(self.launch_uri, attempt)}/{STATUS_FILE}"
        deadline = time.time() + pickup_s(s)
        while time.time() < deadline:
            if self.gcs.exists(status):
                return True
            inst = self.api.get_instance(offer.placement.zone, offer.vm)
            if inst is None or inst.status != "RUNNING":
                break
            time.sleep(s.poll_interval_s)
        self.log.warning(f"warm VM {offer.vm} did not take the step it was handed; deleting it")
        self._delete_unfinished(offer.placement.zone, offer.vm)
        return False

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
        created_at = time.time()

        def create(p: Placement) -> None:
            prices[p] = self._insert(p, name, source_image, prebaked, attempt, created_at)

        self.log.info(f"creating VM {name} (attempt {attempt})")
        result = create_with_failover(s.placements(avoid), create, self.log.warning)
        self.record.failovers += [p.zone for p, _ in result.failures]
        p = result.placement
        price = prices.get(p)
        vm = Vm(
            name,
            p,
            attempt,
            price,
            time.time(),
            how=BOOTED,
            created_at=created_at,
            ledger_key=self._ledger_key(attempt) if price is not None else None,
        )
        self.record.vms.append(vm)
        self.log.info(
            f"VM {name} created in {p.zone}: {p.machine_type} + {p.gpu_count} x {p.gpu_type}, "
            f"{'spot' if s.spot else 'on-demand'}, maxRunDuration {s.max_run_duration_s}s"
        )
        return vm

    def _insert(
        self,
        p: Placement,
        name: str,
        source_image: str,
        prebaked: bool,
        attempt: int,
        created_at: float,
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
        if not s.keep_vm:  # a kept VM is left alone after its step (to ssh in)
            spec = dataclasses.replace(
                spec,
                instructions={
                    **spec.instructions,
                    "warm": warm_block(
                        s,
                        shape=self.shape,
                        endpoint=self.api.endpoint,
                        placement=p,
                        price=price,
                        created_at=created_at,
                        ledger_uri=self.ledger.entry_uri(self._ledger_key(attempt)),
                        ledger_facts=self._ledger_facts(name, p, attempt),
                    ),
                },
            )
        try:
            self._index(name, p, attempt, price, BOOTED, time.time())
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
            facts = self._ledger_facts(name, p, attempt)
            facts.pop("key")
            self.ledger.reserve(
                self._ledger_key(attempt), price * s.max_run_duration_s / 3600, **facts
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

    def _ledger_facts(self, name: str, p: Placement, attempt: int) -> dict[str, Any]:
        return {
            "key": self._ledger_key(attempt),
            "vm": name,
            "zone": p.zone,
            "run_id": self.run_id,
            "step_key": self.step_key,
        }

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
            "vm": BOOTED,
        }

    def _end_vm(self, vm: Vm, outcome: str | None) -> None:
        """Delete the VM and settle its cost, or leave it warm for the next step of its shape
        (the step ended and ``idle_minutes`` > 0: the VM deletes itself when idle)."""
        vm.ended_at = time.time()
        # A cancel may come twice (lab and the daemon both terminate a run): the second
        # must not break off the delete of the VM or the settling of its cost.
        with capture_interrupts():
            self._delete_and_settle(vm, outcome)

    def _delete_and_settle(self, vm: Vm, outcome: str | None) -> None:
        s = self.settings
        settle = vm.how == BOOTED  # this launch created it: its cost is this launch's to settle
        try:
            if s.keep_vm:
                self.log.warning(
                    f"keep_vm: VM {vm.name} left running; connect with: gcloud compute ssh "
                    f"{vm.name} --zone {vm.zone} --project {s.project} (the reaper deletes it "
                    f"after {s.keep_vm_hours} h, maxRunDuration after {s.max_run_duration_s}s)"
                )
            elif s.idle_minutes > 0 and outcome == ENDED:
                settle = False  # the VM settles its whole life's cost when it retires
                self.log.info(
                    f"VM {vm.name} stays warm for the next step of its shape "
                    f"({s.idle_minutes:g} min idle, then it deletes itself; "
                    f"{vm.seconds:.0f} VM-seconds for this step)"
                )
            else:
                deleted = self.api.delete_instance(vm.zone, vm.name)
                settle = settle or deleted
                vm.ended_at = time.time()
                self.log.info(f"VM {vm.name} deleted ({vm.seconds:.0f} VM-seconds)")
        finally:
            if settle and vm.hourly_usd is not None and vm.ledger_key:
                lifetime = max(0.0, (vm.ended_at or time.time()) - (vm.created_at or vm.started_at))
                self.ledger.settle(
                    vm.ledger_key,
                    lifetime / 3600 * vm.hourly_usd,
                    lifetime,
                    vm=vm.name,
                    zone=vm.zone,
                    run_id=self.run_id,
                    step_key=self.step_key,
                )
