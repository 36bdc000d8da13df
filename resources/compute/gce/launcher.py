"""The GCE step launcher: each launched step runs on its own disposable Compute Engine VM.

Per step (see DESIGN.md, "One GPU partition on GCE"):

1. Package the running code (a wheel of the working tree, so uncommitted edits
   run too), the experiment file and the pickled ``StepRunRef`` into GCS under
   ``<staging root>/_launches/<run id>/<step key>/``.
2. Check the budget, then create the VM: the pre-baked image if its family
   exists, else a Deep Learning VM image plus the bootstrap; spot or on-demand;
   labelled experiment/run/partition; ``maxRunDuration`` +
   ``instanceTerminationAction: DELETE`` as a dead-man switch. A zone without
   capacity or quota moves on to the next zone / machine type.
3. The agent on the VM (``resources.remote.agent``) runs the step with the same IO
   manager and streams events, logs and checkpoints to GCS.
4. Relay those events and log lines into the run as they arrive, and delete the
   VM when the step ends, whatever the ending (``finally``; a terminated run
   reaches it through the interrupt or ``GeneratorExit``), unless ``keep_vm``.
5. On a spot preemption start a new VM (any allowed zone, the preempted one
   last), up to ``max_preemptions`` times; the step resumes from its checkpoints.

The VM's facts (zone, machine/GPU type, spot or on-demand, VM seconds, cost,
preemptions) go into each output's materialisation metadata (via the IO manager,
``gce/...`` keys) and, final figures once the VM is gone, into an asset
observation on the same partition.
"""

from __future__ import annotations

import collections
import pickle
import re
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dagster import AssetObservation
from dagster._config.pythonic_config import ConfigurableResourceFactory
from dagster._core.definitions.step_launcher import StepLauncher
from dagster._core.errors import raise_execution_interrupts
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.execution.context.system import StepExecutionContext
from dagster._core.execution.plan.external_step import step_context_to_step_run_ref
from pydantic import Field

from resources.compute.events import EventDecoder, is_terminal
from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.costs import CostLedger, PriceMissing, check_budget, hourly_price
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.placement import Overrides, Placement, candidates, create_with_failover
from resources.compute.local.launcher import StepWorkerError
from resources.remote import protocol
from resources.remote.launch_info import as_metadata

if TYPE_CHECKING:
    from resources.compute.gce.api import ComputeApi


class TooManyPreemptions(RuntimeError):
    pass


@dataclass(frozen=True)
class GceSettings:
    """Everything the launcher needs, resolved (the resource's config, as plain values)."""

    project: str
    zones: tuple[str, ...]
    machine_type: str
    gpu_type: str
    storage_root: str
    experiment: str
    gpu_count: int = 1
    spot: bool = True
    image_family: str = "task-geometry-lab"
    image_project: str | None = None
    fallback_image_family: str = vmbody.DLVM_FAMILY
    fallback_image_project: str = vmbody.DLVM_PROJECT
    boot_disk_gb: int = 100
    max_run_duration_s: int = 4 * 3600
    max_preemptions: int = 3
    service_account: str | None = None
    hourly_usd: dict[str, float] = field(default_factory=dict)
    gpu_zones: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    budget_usd: float = 0.0
    keep_vm: bool = False
    keep_vm_hours: float = 2.0
    experiment_file: str | None = None
    staging_root: str | None = None
    require_gcs_storage: bool = True
    bundle_install: Literal["pip", "skip"] = "pip"
    env: dict[str, str] = field(default_factory=dict)
    api_endpoint: str | None = None
    zone: str | None = None  # per-run overrides (else LAB_GCE_* env vars)
    override_machine_type: str | None = None
    override_gpu_type: str | None = None
    poll_interval_s: float = 2.0
    flush_interval_s: float = 2.0
    heartbeat_s: float = 15.0
    heartbeat_timeout_s: float = 180.0
    boot_timeout_s: float = 1200.0
    instance_check_s: float = 15.0
    grace_s: float = 20.0
    checkpoint_sync_s: float = 30.0
    preempted_poll_s: int = 30

    @property
    def staging(self) -> str:
        root = self.staging_root or f"{self.storage_root.rstrip('/')}/{self.experiment}"
        if not root.startswith("gs://"):
            raise ValueError(
                f"GCE launches stage through GCS: storage root {self.storage_root!r} is not "
                "gs://bucket/prefix (set the experiment's storage or LAB_STORAGE_ROOT)"
            )
        return root.rstrip("/")

    def overrides(self) -> Overrides:
        return Overrides.resolve(self.zone, self.override_machine_type, self.override_gpu_type)

    def placements(self, avoid: tuple[str, ...] = ()) -> list[Placement]:
        return candidates(
            self.zones,
            self.machine_type,
            self.gpu_type,
            self.gpu_count,
            self.gpu_zones,
            self.overrides(),
            avoid,
        )

    def price(self, p: Placement) -> float:
        return hourly_price(self.hourly_usd, p.machine_type, p.gpu_type, p.gpu_count, self.spot)


@dataclass
class Vm:
    name: str
    placement: Placement
    attempt: int
    hourly_usd: float | None
    started_at: float
    ended_at: float | None = None

    @property
    def zone(self) -> str:
        return self.placement.zone

    @property
    def seconds(self) -> float:
        return max(0.0, (self.ended_at or time.time()) - self.started_at)

    @property
    def cost(self) -> float | None:
        return None if self.hourly_usd is None else self.seconds / 3600 * self.hourly_usd


@dataclass
class LaunchRecord:
    """What happened to one step's launch; summed into metadata and the ledger."""

    vms: list[Vm] = field(default_factory=list)
    preemptions: int = 0
    failovers: list[str] = field(default_factory=list)
    materialized: list[tuple[Any, str | None]] = field(default_factory=list)
    step_succeeded: bool = False

    @property
    def vm_seconds(self) -> float:
        return sum(v.seconds for v in self.vms)

    @property
    def cost(self) -> float | None:
        costs = [v.cost for v in self.vms]
        return None if any(c is None for c in costs) else sum(costs)  # type: ignore[arg-type]


def safe_step_key(step_key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", step_key)


def image_for(api: ComputeApi, s: GceSettings) -> tuple[str, bool]:
    """(source image link, pre-baked?): the newest image of the family, else the DLVM family."""
    project = s.image_project or s.project
    image = api.image_from_family(project, s.image_family)
    if image is not None:
        return image.self_link, True
    return (
        f"projects/{s.fallback_image_project}/global/images/family/{s.fallback_image_family}",
        False,
    )


def vm_labels(s: GceSettings, run_id: str, step_key: str, partition: str | None, attempt: int):
    extra = {}
    if s.keep_vm:
        extra["lab_keep_until"] = str(int(time.time() + s.keep_vm_hours * 3600))
    return vmbody.labels(
        experiment=s.experiment,
        run=run_id,
        partition=partition or "none",
        step=step_key,
        attempt=str(attempt),
        **extra,
    )


def build_vm_spec(
    s: GceSettings,
    *,
    placement: Placement,
    name: str,
    source_image: str,
    prebaked: bool,
    launch_uri: str,
    attempt: int,
    run_id: str,
    step_key: str,
    partition: str | None,
    launch_info: dict[str, Any],
) -> vmbody.VmSpec:
    instructions = {
        "version": 1,
        "mode": "step",
        "launch_uri": launch_uri,
        "attempt": attempt,
        "bundle_install": s.bundle_install,
        "env": {
            "LAB_STORAGE_ROOT": s.storage_root,
            "GOOGLE_CLOUD_PROJECT": s.project,
            **s.env,
        },
        "flush_interval_s": s.flush_interval_s,
        "heartbeat_s": s.heartbeat_s,
        "grace_s": s.grace_s,
        "checkpoint_sync_s": s.checkpoint_sync_s,
        "preempted_poll_s": s.preempted_poll_s,
        "launch_info": launch_info,
        "partition": partition,
        "step_key": step_key,
        "run_id": run_id,
    }
    extra = {} if prebaked else {"install-nvidia-driver": "True"}
    return vmbody.VmSpec(
        project=s.project,
        zone=placement.zone,
        name=name,
        machine_type=placement.machine_type,
        source_image=source_image,
        gpu_type=placement.gpu_type,
        gpu_count=placement.gpu_count,
        spot=s.spot,
        boot_disk_gb=s.boot_disk_gb,
        max_run_duration_s=s.max_run_duration_s,
        service_account=s.service_account,
        labels=vm_labels(s, run_id, step_key, partition, attempt),
        instructions=instructions,
        extra_metadata=extra,
    )


class GceStepLauncher(StepLauncher):
    def __init__(
        self,
        settings: GceSettings,
        api: ComputeApi | None = None,
        gcs: Gcs | None = None,
        build_wheel: Callable[[], Path] | None = None,
    ):
        self.settings = settings
        self._api = api
        self._gcs = gcs
        self._build_wheel = build_wheel

    @property
    def api(self) -> ComputeApi:
        if self._api is None:
            from resources.compute.gce.api import (
                ComputeApi,  # ~1.5 s to import; only when launching
            )

            self._api = ComputeApi(self.settings.project, endpoint=self.settings.api_endpoint)
        return self._api

    @property
    def gcs(self) -> Gcs:
        if self._gcs is None:
            self._gcs = Gcs()
        return self._gcs

    def ledger(self) -> CostLedger:
        return CostLedger(self.gcs, f"{self.settings.staging}/_gce/ledger")

    # -- the launch -----------------------------------------------------------------------

    def launch_step(self, step_context: StepExecutionContext) -> Iterator[DagsterEvent]:
        s = self.settings
        if s.require_gcs_storage and not s.storage_root.startswith("gs://"):
            raise ValueError(
                f"storage root {s.storage_root!r} is local: a GCE VM cannot read or write it; "
                "use gs://bucket/prefix"
            )
        step_run_ref = step_context_to_step_run_ref(step_context)
        run_id = step_context.dagster_run.run_id
        step_key = step_run_ref.step_key
        partition = step_context.partition_key if step_context.has_partition_key else None
        launch_uri = f"{s.staging}/_launches/{run_id}/{safe_step_key(step_key)}"
        log = step_context.log
        record = LaunchRecord()
        succeeded = False
        # Refuse an over-budget launch before uploading anything.
        self._check_budget(s.placements()[0], log)
        self._upload_bundle(launch_uri, pickle.dumps(step_run_ref), log)
        try:
            with raise_execution_interrupts():
                yield from self._attempts(
                    step_context, record, launch_uri, run_id, step_key, partition
                )
            succeeded = True
        finally:
            summary = self._summary(record)
            if record.vms:
                log.info(f"GCE launch of {step_key}: {summary}")
            if succeeded and record.step_succeeded and not s.keep_vm:
                self.gcs.delete_prefix(launch_uri)
            elif record.vms:
                log.info(f"launch files (events, logs, checkpoints) kept at {launch_uri}/")
        for asset_key, part in record.materialized:
            DagsterEvent.asset_observation(
                step_context,
                AssetObservation(
                    asset_key=asset_key,
                    partition=part,
                    description="GCE launch: final VM time and cost",
                    metadata=self._final_metadata(record),
                ),
            )

    def _summary(self, record: LaunchRecord) -> str:
        if not record.vms:
            return "no VM created"
        last = record.vms[-1]
        cost = record.cost
        return (
            f"{len(record.vms)} VM(s), {record.vm_seconds:.0f} VM-seconds, last zone {last.zone} "
            f"({last.placement.machine_type} + {last.placement.gpu_count} x "
            f"{last.placement.gpu_type}, {'spot' if self.settings.spot else 'on-demand'}), "
            f"{record.preemptions} preemption(s), "
            + (f"${cost:.4f}" if cost is not None else "cost unknown (no price)")
        )

    def _final_metadata(self, record: LaunchRecord) -> dict[str, Any]:
        last = record.vms[-1]
        info = {
            "vm_name": last.name,
            "zone": last.zone,
            "machine_type": last.placement.machine_type,
            "gpu_type": last.placement.gpu_type,
            "gpu_count": last.placement.gpu_count,
            "spot": self.settings.spot,
            "hourly_usd": last.hourly_usd,
            "preemptions": record.preemptions,
        }
        meta = as_metadata(info, vm_seconds=record.vm_seconds, cost_usd=record.cost)
        meta["gce/zones_used"] = ", ".join(v.zone for v in record.vms)
        if record.failovers:
            meta["gce/zones_without_capacity"] = ", ".join(record.failovers)
        return meta

    def _check_budget(self, placement: Placement, log) -> float | None:
        s = self.settings
        try:
            price = s.price(placement)
        except PriceMissing as e:
            if s.budget_usd > 0:
                raise PriceMissing(f"{e}; a budget is set, so every VM needs a price") from None
            log.warning(f"{e}: VM cost will not be recorded")
            return None
        worst = price * s.max_run_duration_s / 3600
        spent = self.ledger().spent() if s.budget_usd > 0 else 0.0
        check_budget(
            s.budget_usd,
            spent,
            worst,
            f"${price:.3f}/h x {s.max_run_duration_s / 3600:.2f} h maxRunDuration, "
            f"{placement.machine_type} + {placement.gpu_count} x {placement.gpu_type}",
        )
        return price

    def _upload_bundle(self, launch_uri: str, ref: bytes, log) -> None:
        s = self.settings
        if s.bundle_install == "pip":
            from resources.compute.gce.bundle import build_wheel

            wheel = (self._build_wheel or build_wheel)()
            self.gcs.upload_file(f"{launch_uri}/{protocol.BUNDLE_DIR}/{wheel.name}", wheel)
            log.info(f"bundle: {wheel.name} (working tree) -> {launch_uri}/")
        self.gcs.upload_bytes(f"{launch_uri}/{protocol.STEP_RUN_REF}", ref)
        if s.experiment_file:
            self.gcs.upload_file(
                f"{launch_uri}/{protocol.EXPERIMENT_FILE}", Path(s.experiment_file)
            )

    def _attempts(
        self,
        step_context: StepExecutionContext,
        record: LaunchRecord,
        launch_uri: str,
        run_id: str,
        step_key: str,
        partition: str | None,
    ) -> Generator[DagsterEvent, None, None]:
        s = self.settings
        log = step_context.log
        avoid: tuple[str, ...] = ()
        attempt = 0
        while True:
            attempt += 1
            vm = self._create_vm(
                record, launch_uri, run_id, step_key, partition, attempt, avoid, log
            )
            try:
                outcome = yield from self._follow(step_context, record, vm, launch_uri)
            finally:
                self._end_vm(vm, run_id, step_key, log)
            if outcome == "ended":
                return
            record.preemptions += 1
            if record.preemptions > s.max_preemptions:
                raise TooManyPreemptions(
                    f"{step_key}: preempted {record.preemptions} times "
                    f"(max_preemptions {s.max_preemptions}); giving up"
                )
            log.warning(
                f"VM {vm.name} in {vm.zone} was preempted ({record.preemptions}/"
                f"{s.max_preemptions}); resuming from the last checkpoint on a new VM"
            )
            avoid = (vm.zone,)

    def _create_vm(
        self,
        record: LaunchRecord,
        launch_uri: str,
        run_id: str,
        step_key: str,
        partition: str | None,
        attempt: int,
        avoid: tuple[str, ...],
        log,
    ) -> Vm:
        s = self.settings
        name = vmbody.vm_name(s.experiment, run_id, step_key, attempt)
        source_image, prebaked = image_for(self.api, s)
        if not prebaked:
            log.warning(
                f"no image in family {s.image_family!r} (project {s.image_project or s.project}); "
                f"booting {source_image} with the bootstrap (slow: build one with `lab image build`)"
            )
        created: dict[str, Any] = {}

        def create(p: Placement) -> None:
            price = self._check_budget(p, log)
            info = {
                "vm_name": name,
                "zone": p.zone,
                "machine_type": p.machine_type,
                "gpu_type": p.gpu_type,
                "gpu_count": p.gpu_count,
                "spot": s.spot,
                "hourly_usd": price,
                "preemptions": record.preemptions,
                "previous_vm_seconds": record.vm_seconds,
                "previous_cost_usd": record.cost or 0.0,
                "vm_started_at": time.time(),
            }
            spec = build_vm_spec(
                s,
                placement=p,
                name=name,
                source_image=source_image,
                prebaked=prebaked,
                launch_uri=launch_uri,
                attempt=attempt,
                run_id=run_id,
                step_key=step_key,
                partition=partition,
                launch_info=info,
            )
            self.api.insert_instance(p.zone, vmbody.build_instance(spec))
            created["price"] = price
            if price is None:
                return
            try:
                self.ledger().reserve(
                    f"{run_id}.{safe_step_key(step_key)}.a{attempt}",
                    price * s.max_run_duration_s / 3600,
                    vm=name,
                    zone=p.zone,
                    run_id=run_id,
                    step_key=step_key,
                )
            except BaseException:
                self.api.delete_instance(p.zone, name)  # not tracked yet: do not leak it
                raise

        log.info(f"creating VM {name} (attempt {attempt})")
        result = create_with_failover(s.placements(avoid), create, log.warning)
        record.failovers += [p.zone for p, _ in result.failures]
        p = result.placement
        vm = Vm(name, p, attempt, created.get("price"), time.time())
        record.vms.append(vm)
        log.info(
            f"VM {name} created in {p.zone}: {p.machine_type} + {p.gpu_count} x {p.gpu_type}, "
            f"{'spot' if s.spot else 'on-demand'}, maxRunDuration {s.max_run_duration_s}s"
        )
        return vm

    def _end_vm(self, vm: Vm, run_id: str, step_key: str, log) -> None:
        s = self.settings
        vm.ended_at = time.time()
        try:
            if s.keep_vm:
                log.warning(
                    f"keep_vm: VM {vm.name} left running; connect with: gcloud compute ssh "
                    f"{vm.name} --zone {vm.zone} --project {s.project} (the reaper deletes it "
                    f"after {s.keep_vm_hours} h, maxRunDuration after {s.max_run_duration_s}s)"
                )
            else:
                self.api.delete_instance(vm.zone, vm.name)
                vm.ended_at = time.time()
                log.info(f"VM {vm.name} deleted ({vm.seconds:.0f} VM-seconds)")
        finally:
            if vm.hourly_usd is not None:
                self.ledger().settle(
                    f"{run_id}.{safe_step_key(step_key)}.a{vm.attempt}",
                    vm.cost or 0.0,
                    vm.seconds,
                    vm=vm.name,
                    zone=vm.zone,
                    run_id=run_id,
                    step_key=step_key,
                )

    def _follow(
        self,
        step_context: StepExecutionContext,
        record: LaunchRecord,
        vm: Vm,
        launch_uri: str,
    ) -> Generator[DagsterEvent, None, str]:
        """Relay the VM's events and logs until the step ends ('ended') or the VM is
        preempted ('preempted'); anything else raises."""
        s = self.settings
        prefix = protocol.attempt_prefix(launch_uri, vm.attempt)
        events = _ChunkReader(self.gcs, f"{prefix}/{protocol.EVENTS_DIR}", "jsonl")
        logs = _ChunkReader(self.gcs, f"{prefix}/{protocol.LOGS_DIR}", "txt")
        decoder = EventDecoder()
        recent: collections.deque[str] = collections.deque(maxlen=40)
        ended = False
        last_check = time.time()
        resumed = vm.attempt > 1

        def relay() -> Iterator[DagsterEvent]:
            nonlocal ended
            for data in events.poll():
                for entry in decoder.feed(data):
                    ev = entry.dagster_event if entry.is_dagster_event else None
                    if resumed and ev is not None and ev.event_type == DagsterEventType.STEP_START:
                        continue  # the step started once already, on the first VM
                    step_context.instance.handle_new_event(entry)
                    ended = ended or is_terminal(entry)
                    if ev is not None:
                        if ev.event_type == DagsterEventType.STEP_SUCCESS:
                            record.step_succeeded = True
                        if ev.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                            m = ev.step_materialization_data.materialization
                            record.materialized.append((m.asset_key, m.partition))
                        yield ev
            for data in logs.poll():
                for line in data.decode("utf-8", "replace").splitlines():
                    recent.append(line)
                    step_context.log.debug(f"[{vm.name}] {line}")

        while True:
            yield from relay()
            if ended:
                # The agent ships the worker's last output lines after its last event.
                deadline = time.time() + 3 * s.flush_interval_s + s.poll_interval_s
                while time.time() < deadline:
                    status = self.gcs.read_json(f"{prefix}/{protocol.STATUS_FILE}") or {}
                    yield from relay()
                    if status.get("state") in ("exited", "failed", "preempted"):
                        break
                    time.sleep(s.poll_interval_s)
                return "ended"
            status = self.gcs.read_json(f"{prefix}/{protocol.STATUS_FILE}")
            state = (status or {}).get("state")
            if state in ("exited", "failed", "preempted"):
                yield from relay()  # the agent flushed everything before writing its status
                if ended:
                    return "ended"
                if state == "preempted" and (status.get("confirmed") or self._preempted(vm)):
                    return "preempted"
                detail = status.get("error") or f"code {status.get('returncode')}"
                raise StepWorkerError(
                    f"step on VM {vm.name} ended ({state}, {detail}) before the step ended; "
                    "its last output:\n" + "\n".join(recent)
                )
            now = time.time()
            if status is None and now - vm.started_at > s.boot_timeout_s:
                raise StepWorkerError(
                    f"VM {vm.name}: the agent never reported in {s.boot_timeout_s:.0f}s "
                    f"(see its serial console: gcloud compute instances get-serial-port-output "
                    f"{vm.name} --zone {vm.zone} --project {s.project})"
                )
            if status is not None and now - float(status.get("t", now)) > s.heartbeat_timeout_s:
                raise StepWorkerError(
                    f"VM {vm.name}: no heartbeat from the agent for {s.heartbeat_timeout_s:.0f}s; "
                    "last output:\n" + "\n".join(recent)
                )
            if now - last_check >= s.instance_check_s:
                last_check = now
                inst = self.api.get_instance(vm.zone, vm.name)
                if inst is None or inst.status in ("STOPPING", "TERMINATED", "SUSPENDED"):
                    time.sleep(s.poll_interval_s)  # let a final status land
                    yield from relay()
                    if ended:
                        return "ended"
                    status = self.gcs.read_json(f"{prefix}/{protocol.STATUS_FILE}") or {}
                    if status.get("state") == "preempted" or self._preempted(vm):
                        return "preempted"
                    gone = "was deleted" if inst is None else f"is {inst.status}"
                    if vm.seconds >= s.max_run_duration_s:
                        gone += f" (maxRunDuration {s.max_run_duration_s}s reached)"
                    raise StepWorkerError(
                        f"VM {vm.name} {gone} before the step ended; last output:\n"
                        + "\n".join(recent)
                    )
            time.sleep(s.poll_interval_s)

    def _preempted(self, vm: Vm) -> bool:
        return self.settings.spot and self.api.was_preempted(vm.zone, vm.name)


class _ChunkReader:
    """Reads an agent chunk stream: the next numbered object, while it exists."""

    def __init__(self, gcs: Gcs, prefix: str, suffix: str):
        self.gcs, self.prefix, self.suffix = gcs, prefix, suffix
        self.next_index = 0

    def poll(self) -> Iterator[bytes]:
        while True:
            data = self.gcs.read_bytes(
                protocol.chunk_name(self.prefix, self.next_index, self.suffix)
            )
            if data is None:
                return
            self.next_index += 1
            yield data


class GceStepLauncherResource(ConfigurableResourceFactory[StepLauncher]):
    """Runs each step that requires it on its own disposable GCE VM.

    Built from the experiment's ``compute`` section by the definitions; the
    per-run fields (``zone``, ``machine_type_override``, ``gpu_type_override``,
    ``keep_vm``) can be set in a run's config under
    ``resources.step_launcher.config``.
    """

    project: str
    zones: list[str]
    machine_type: str
    gpu_type: str
    storage_root: str
    experiment: str
    gpu_count: int = 1
    spot: bool = True
    image_family: str = "task-geometry-lab"
    image_project: str | None = None
    fallback_image_family: str = vmbody.DLVM_FAMILY
    fallback_image_project: str = vmbody.DLVM_PROJECT
    boot_disk_gb: int = 100
    max_run_duration_s: int = 4 * 3600
    max_preemptions: int = 3
    service_account: str | None = None
    hourly_usd: dict[str, float] = Field(default_factory=dict)
    gpu_zones: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    budget_usd: float = 0.0
    keep_vm: bool = False
    keep_vm_hours: float = 2.0
    experiment_file: str | None = None
    staging_root: str | None = None
    require_gcs_storage: bool = True
    bundle_install: str = "pip"
    env: dict[str, str] = Field(default_factory=dict)
    api_endpoint: str | None = None
    zone: str | None = Field(None, description="run this step in this zone only")
    machine_type_override: str | None = None
    gpu_type_override: str | None = None
    poll_interval_s: float = 2.0
    flush_interval_s: float = 2.0
    heartbeat_s: float = 15.0
    heartbeat_timeout_s: float = 180.0
    boot_timeout_s: float = 1200.0
    instance_check_s: float = 15.0
    grace_s: float = 20.0
    checkpoint_sync_s: float = 30.0
    preempted_poll_s: int = 30

    def settings(self) -> GceSettings:
        d = {k: getattr(self, k) for k in GceSettings.__dataclass_fields__ if hasattr(self, k)}
        d["zones"] = tuple(self.zones)
        d["override_machine_type"] = self.machine_type_override
        d["override_gpu_type"] = self.gpu_type_override
        if self.bundle_install not in ("pip", "skip"):
            raise ValueError(f"bundle_install must be 'pip' or 'skip', not {self.bundle_install!r}")
        return GceSettings(**d)

    def create_resource(self, context) -> StepLauncher:
        return GceStepLauncher(self.settings())
