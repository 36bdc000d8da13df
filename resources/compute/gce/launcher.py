"""The GCE step launcher: each launched step runs on its own disposable Compute Engine VM.

This module is the Dagster-facing shell: the ``StepLauncher`` and the resource
that builds it from its config (``settings.LaunchSettings``, field for field).
Per step (the README's "GPU steps on Compute Engine" walks through the same):

1. Package the running code (a wheel of the working tree, so uncommitted edits
   run too), the experiment file and the pickled ``StepRunRef`` into GCS under
   ``<staging root>/_launches/<run id>/<step key>/`` (here).
2. Check the budget, then create the VM: the pre-baked image if its family
   exists, else a Deep Learning VM image plus the bootstrap; spot or on-demand;
   labelled experiment/run/partition; ``maxRunDuration`` +
   ``instanceTerminationAction: DELETE`` as a dead-man switch. A zone without
   capacity or quota moves on to the next zone / machine type (``attempts``,
   the VM's body from ``step_vm``).
3. The agent on the VM (``resources/remote/agent.py``, shipped as text, never
   imported here) runs the step with the same IO manager and streams events,
   logs and checkpoints to GCS.
4. Relay those events and log lines into the run as they arrive (``follow``), and
   delete the VM when the step ends, whatever the ending (``finally``; a
   terminated run reaches it through the interrupt or ``GeneratorExit``), unless
   ``keep_vm``.
5. On a spot preemption start a new VM (any allowed zone, the preempted one
   last), up to ``max_preemptions`` times; the step resumes from its checkpoints
   (``attempts``).

The VM's facts (zone, machine/GPU type, spot or on-demand, VM seconds, cost,
preemptions) go into each output's materialisation metadata (via the IO manager,
``gce/...`` keys) and, final figures once the VM is gone, into an asset
observation on the same partition (``record``).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import AssetObservation
from dagster._config.pythonic_config import ConfigurableResourceFactory
from dagster._core.definitions.step_launcher import StepLauncher
from dagster._core.errors import raise_execution_interrupts
from dagster._core.events import DagsterEvent
from dagster._core.execution.context.system import StepExecutionContext
from dagster._core.execution.plan.external_step import step_context_to_step_run_ref

from resources.compute.gce.attempts import StepAttempts, check_launch_budget
from resources.compute.gce.costs import CostLedger
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.record import LaunchRecord
from resources.compute.gce.settings import LaunchSettings
from resources.compute.gce.step_vm import safe_step_key
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
        launch_uri = f"{s.staging}/_launches/{run_id}/{safe_step_key(step_key)}"
        log = step_context.log
        record = LaunchRecord()
        succeeded = False
        ledger = self.ledger()
        # Refuse an over-budget launch before uploading anything.
        check_launch_budget(s, ledger, s.placements()[0], log)
        self._upload_bundle(launch_uri, pickle.dumps(step_run_ref), log)
        try:
            with raise_execution_interrupts():
                attempts = StepAttempts(
                    settings=s,
                    api=self.api,
                    gcs=self.gcs,
                    ledger=ledger,
                    step_context=step_context,
                    record=record,
                    launch_uri=launch_uri,
                    run_id=run_id,
                    step_key=step_key,
                    partition=partition,
                )
                yield from attempts.run()
            succeeded = True
        finally:
            if record.vms:
                log.info(f"GCE launch of {step_key}: {record.summary(s.spot)}")
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
                    metadata=record.final_metadata(s.spot),
                ),
            )

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
