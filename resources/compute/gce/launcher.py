"""The GCE step launcher: each launched step runs on a Compute Engine VM, booted or warm.

This module is the Dagster-facing shell: the ``StepLauncher`` and the resource
that builds it from its config (``settings.LaunchSettings``, field for field).
Per step (the README's "GPU steps on Compute Engine" walks through the same):

0. Hold this process's orchestrator lease (``lease``) and look the step up in the
   in-flight index (``inflight``: experiment, step, partition, recipe): an earlier
   launch of the same work that finished is relayed (its outputs used, no VM), one
   still running is re-attached to (its events relayed, no second VM), one left
   unfinished (preempted or lost with its orchestrator) is resumed from its
   checkpoints; otherwise the step gets an entry of its own.
1. Package the running code (a wheel of the working tree, so uncommitted edits
   run too), the experiment file and the pickled ``StepRunRef`` into GCS under
   ``<staging root>/_launches/<run id>/<step key>/`` (here).
2. Check the budget, then take a warm VM of the step's shape (``warm``, when
   ``idle_minutes`` > 0) or create one: the pre-baked image if its family
   exists, else a Deep Learning VM image plus the bootstrap; spot or on-demand;
   labelled experiment/run/partition; ``maxRunDuration`` +
   ``instanceTerminationAction: DELETE`` as a dead-man switch. A zone without
   capacity or quota moves on to the next zone / machine type (``attempts``,
   the VM's body from ``step_vm``).
3. The agent on the VM (``resources/remote/agent.py``, shipped as text, never
   imported here) runs the step with the same IO manager and streams events,
   logs and checkpoints to GCS; the step runs to its end whether or not this
   process is still there.
4. Relay those events and log lines into the run as they arrive (``follow``). When
   the step ends the VM stays warm for the next step of its shape (it deletes itself
   after ``idle_minutes``, or at once when no orchestrator lease is live); with
   ``idle_minutes: 0``, after any error, and on a cancel (the interrupt or
   ``GeneratorExit``) it is deleted here, unless ``keep_vm``.
5. On a spot preemption start a new VM (any allowed zone, the preempted one
   last), up to ``max_preemptions`` times; the step resumes from its checkpoints
   (``attempts``).

The VM's facts (zone, machine/GPU type, spot or on-demand, VM seconds, cost,
preemptions, booted or reused and how long the step waited for it) go into each
output's materialisation metadata (via the IO manager, ``gce/...`` keys) and, final
figures once the step is done with the VM, into an asset observation on the same
partition (``record``).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import AssetObservation
from dagster._config.pythonic_config import ConfigurableResourceFactory
from dagster._core.definitions.step_launcher import StepLauncher
from dagster._core.errors import raise_execution_interrupts
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.execution.context.system import StepExecutionContext
from dagster._core.execution.plan.external_step import step_context_to_step_run_ref

from resources.compute.gce import objects
from resources.compute.gce.attempts import StepAttempts, check_launch_budget
from resources.compute.gce.costs import CostLedger
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.inflight import (
    BOOTING,
    CREATING,
    FAILED,
    RESUMABLE,
    RUNNING,
    SUCCEEDED,
    InflightIndex,
    events_of,
    for_run,
    launch_state,
    recipe_key,
)
from resources.compute.gce.lease import is_live, lease_for
from resources.compute.gce.placement import Placement
from resources.compute.gce.record import ATTACHED, REUSED, LaunchRecord, Vm
from resources.compute.gce.settings import LaunchSettings
from resources.compute.gce.step_vm import safe_step_key
from resources.compute.gce.warm import bundle_hash, pickup_s, shape_of
from resources.remote import protocol

if TYPE_CHECKING:
    from resources.compute.gce.api import ComputeApi


class GceStepLauncher(StepLauncher):
    def __init__(
        self,
        settings: LaunchSettings,
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
        log = step_context.log
        record = LaunchRecord()
        ledger = self.ledger()
        wheel = self._wheel() if s.bundle_install == "pip" else None
        bundle = bundle_hash(wheel)
        key = recipe_key(s, step_key, partition, step_run_ref.run_config, bundle)
        index = InflightIndex(self.gcs, s.staging)
        lease = lease_for(self.gcs, s.staging, s.lease_ttl_s)
        with lease.hold():
            plan = self._plan(index, key, lease.id, run_id, step_key, partition, log)
            if plan.kind == SUCCEEDED:
                yield from self._relay_finished(step_context, record, plan)
                self._finish(index, key, lease.id, record, plan.launch_uri, True, log, step_key)
                yield from self._observations(step_context, record)
                return
            if plan.kind in (FRESH, RESUMABLE):
                # Refuse an over-budget launch before uploading anything.
                check_launch_budget(s, ledger, s.placements()[0], log)
                self._upload_bundle(plan.launch_uri, pickle.dumps(step_run_ref), wheel, log)
            succeeded = False
            try:
                with raise_execution_interrupts():
                    attempts = StepAttempts(
                        settings=s,
                        api=self.api,
                        gcs=self.gcs,
                        ledger=ledger,
                        step_context=step_context,
                        record=record,
                        launch_uri=plan.launch_uri,
                        run_id=run_id,
                        step_key=step_key,
                        partition=partition,
                        shape=shape_of(s, bundle),
                        lease_id=lease.id,
                        index=index,
                        index_key=key,
                        first_attempt=plan.first_attempt,
                        attach=plan.attach,
                    )
                    yield from attempts.run()
                succeeded = True
            finally:
                # Whatever the ending seen here (success, failure, cancel), the work is no
                # longer in flight; only a killed orchestrator leaves its entry behind.
                self._finish(
                    index, key, lease.id, record, plan.launch_uri, succeeded, log, step_key
                )
        yield from self._observations(step_context, record)

    def _plan(
        self,
        index: InflightIndex,
        key: str,
        lease_id: str,
        run_id: str,
        step_key: str,
        partition: str | None,
        log,
    ) -> Plan:
        """Own the partition's entry in the in-flight index, and say what to do with it:
        a fresh launch, or take over an earlier one (relay it, re-attach to it, resume it)."""
        s = self.settings
        give_up = time.time() + s.boot_timeout_s
        while True:
            rec, generation = index.read(key)
            now = time.time()
            if rec is None:
                uri = f"{s.staging}/_launches/{run_id}/{safe_step_key(step_key)}"
                fresh = {
                    "key": key,
                    "launch_uri": uri,
                    "run_id": run_id,
                    "step_key": step_key,
                    "partition": partition,
                    "attempt": 0,
                    "vm": None,
                    "owner": lease_id,
                    "t": now,
                }
                if index.create(key, fresh):
                    return Plan(FRESH, uri)
                continue  # another orchestrator launched it first: look again
            owner = str(rec.get("owner") or "")
            owner_live = owner == lease_id or is_live(self.gcs, s.staging, owner, s.lease_ttl_s)
            state = launch_state(self.gcs, rec, s, owner_live, now)
            if state == CREATING:
                if now > give_up:
                    raise RuntimeError(
                        f"{step_key}: orchestrator {owner} has been creating its VM for "
                        f"{s.boot_timeout_s:.0f}s (in-flight index {index.uri(key)})"
                    )
                time.sleep(s.poll_interval_s)
                continue
            if state == FAILED:  # not in flight: launch afresh
                objects.delete(self.gcs, index.uri(key), generation)
                continue
            if state == BOOTING and not self._may_take_it(rec, now):
                state = RESUMABLE
            if not index.replace(key, {**rec, "owner": lease_id, "t": now}, generation):
                continue  # it changed under us: look again
            uri, attempt = rec["launch_uri"], int(rec.get("attempt") or 0)
            earlier = f"launch {uri} of run {rec.get('run_id')}"
            if state == SUCCEEDED:
                log.info(f"{step_key}: finished already in {earlier}; using its outputs, no VM")
                return Plan(SUCCEEDED, uri, attempt)
            if state == RESUMABLE:
                self._forget_vm(rec, log)
                log.warning(
                    f"{step_key}: {earlier} was left unfinished (preempted or lost with its "
                    f"orchestrator); resuming it from its checkpoints as attempt {attempt + 1}"
                )
                return Plan(RESUMABLE, uri, attempt + 1)
            vm = _vm_of(rec)
            log.info(
                f"{step_key}: still {state} in {earlier} on VM {vm.name}; re-attaching to its "
                "event stream (no new VM)"
            )
            return Plan(RUNNING, uri, attempt, vm)

    def _may_take_it(self, rec: dict, now: float) -> bool:
        """Whether the VM an entry names (no status from it yet) can still start the step:
        it exists, and (a warm VM handed the step) it has not let the pickup time pass."""
        s = self.settings
        inst = self.api.get_instance(rec["zone"], rec["vm"])
        if inst is None or inst.status not in ("PROVISIONING", "STAGING", "RUNNING"):
            return False
        waited = now - float(rec.get("vm_started_at") or 0)
        return rec.get("how") != REUSED or waited < pickup_s(s)

    def _forget_vm(self, rec: dict, log) -> None:
        """Delete the VM an unfinished launch last named (if it is still there) before its
        work is resumed on another: two VMs must never run one step."""
        if not rec.get("vm") or not rec.get("zone"):
            return
        try:
            if self.api.delete_instance(rec["zone"], rec["vm"], wait=False):
                log.warning(f"deleted VM {rec['vm']}: its launch is resumed on another VM")
        except Exception as e:  # noqa: BLE001 - a VM of a lost launch: the reaper's then
            log.warning(f"VM {rec['vm']} of the unfinished launch not deleted: {e}")

    def _relay_finished(self, step_context, record: LaunchRecord, plan: Plan):
        """The events of a launch that finished without its orchestrator, into this run."""
        record.reused_launch = plan.launch_uri
        for raw in events_of(self.gcs, plan.launch_uri, plan.first_attempt):
            entry = for_run(raw, step_context)
            step_context.instance.handle_new_event(entry)
            ev = entry.dagster_event if entry.is_dagster_event else None
            if ev is None:
                continue
            if ev.event_type == DagsterEventType.STEP_SUCCESS:
                record.step_succeeded = True
            if ev.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                m = ev.step_materialization_data.materialization
                record.materialized.append((m.asset_key, m.partition))
            yield ev

    def _finish(
        self,
        index: InflightIndex,
        key: str,
        lease_id: str,
        record: LaunchRecord,
        launch_uri: str,
        succeeded: bool,
        log,
        step_key: str,
    ) -> None:
        s = self.settings
        try:
            index.remove(key, owner=lease_id)
        except Exception as e:  # noqa: BLE001 - a stale entry only costs a re-run a look
            log.warning(f"in-flight index entry {key} not removed: {e}")
        if record.vms or record.reused_launch:
            log.info(f"GCE launch of {step_key}: {record.summary(s.spot)}")
        if succeeded and record.step_succeeded and not s.keep_vm:
            self.gcs.delete_prefix(launch_uri)
        elif record.vms:
            log.info(f"launch files (events, logs, checkpoints) kept at {launch_uri}/")

    def _observations(self, step_context, record: LaunchRecord) -> Iterator[DagsterEvent]:
        for asset_key, part in record.materialized:
            yield DagsterEvent.asset_observation(
                step_context,
                AssetObservation(
                    asset_key=asset_key,
                    partition=part,
                    description="GCE launch: final VM time and cost",
                    metadata=record.final_metadata(self.settings.spot),
                ),
            )

    def _wheel(self) -> Path:
        from resources.compute.gce.bundle import build_wheel

        return (self._build_wheel or build_wheel)()

    def _upload_bundle(self, launch_uri: str, ref: bytes, wheel: Path | None, log) -> None:
        s = self.settings
        if wheel is not None:
            self.gcs.upload_file(f"{launch_uri}/{protocol.BUNDLE_DIR}/{wheel.name}", wheel)
            log.info(f"bundle: {wheel.name} (working tree) -> {launch_uri}/")
        self.gcs.upload_bytes(f"{launch_uri}/{protocol.STEP_RUN_REF}", ref)
        if s.experiment_file:
            self.gcs.upload_file(
                f"{launch_uri}/{protocol.EXPERIMENT_FILE}", Path(s.experiment_file)
            )


FRESH = "fresh"


@dataclass(frozen=True)
class Plan:
    """What a launch does: FRESH (new launch), RESUMABLE (a new attempt of an earlier
    launch), RUNNING (re-attach to ``attach``), SUCCEEDED (relay an earlier launch)."""

    kind: str
    launch_uri: str
    first_attempt: int = 1
    attach: Vm | None = None


def _vm_of(rec: dict) -> Vm:
    """The VM an in-flight index entry names, as a launch re-attached to it sees it."""
    p = Placement(rec["zone"], rec["machine_type"], rec["gpu_type"], int(rec["gpu_count"]))
    return Vm(
        rec["vm"],
        p,
        int(rec["attempt"]),
        rec.get("hourly_usd"),
        float(rec.get("vm_started_at") or time.time()),
        how=ATTACHED,
        created_at=rec.get("vm_created_at"),
        ledger_key=rec.get("ledger_key"),
    )


class GceStepLauncherResource(ConfigurableResourceFactory[StepLauncher], LaunchSettings):
    """Runs each step that requires it on its own disposable GCE VM.

    Its config is ``LaunchSettings``, flat: the experiment's ``compute`` section plus
    storage root, experiment, budget (``lab_assets.defs.resources`` fills them in and
    configures it at launch). A run may set any field under
    ``resources.step_launcher.config``: the per-run ``zone``,
    ``machine_type_override``, ``gpu_type_override`` and ``keep_vm`` above all.
    """

    def launch_settings(self) -> LaunchSettings:
        return LaunchSettings(**{k: getattr(self, k) for k in LaunchSettings.model_fields})

    def create_resource(self, context) -> StepLauncher:
        return GceStepLauncher(self.launch_settings())
