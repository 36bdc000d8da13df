"""The in-flight index: which launch owns a partition's recipe, so work in flight is never redone.

A step on a VM runs to its end and commits its outputs even if the orchestrator that
launched it is killed. When the partition is launched again (a retry, ``lab sweep``,
a backfill) the launcher looks here first, under
``<staging>/_gce/inflight/<step>/<partition>-<recipe hash>.json``. The recipe is
what makes two launches the same work: experiment, step, partition, the step's op
config, the experiment file and the code bundle. The entry names the launch
(its URI in GCS), its current attempt and VM, and the lease of the orchestrator
that owns it. Its state (``launch_state``) comes from the attempt's own status
and events, which the agent writes whatever happens to the orchestrator:

- ``succeeded``: the step ended with STEP_SUCCESS: relay its events, no VM;
- ``running`` / ``booting``: re-attach to the VM's event stream, no second VM;
- ``resumable``: preempted or lost with nobody watching: a new attempt of the same
  launch, resuming from its checkpoints;
- ``failed``: not in flight: a fresh launch;
- ``creating``: the owner is creating the VM right now: wait.

The entry is created with ``ifGenerationMatch=0`` (two orchestrators racing for
one partition: one launches, the other re-attaches) and replaced with the
generation it was read at; the launcher that saw the step end removes it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dagster._core.events import DagsterEventType
from dagster._core.events.log import EventLogEntry
from dagster._core.execution.context.system import StepExecutionContext

from resources.compute.events import EventDecoder
from resources.compute.gce import objects
from resources.compute.gce.chunks import ChunkReader
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.settings import LaunchSettings
from resources.compute.gce.step_vm import safe_step_key
from resources.remote import protocol

SUCCEEDED, FAILED, RUNNING, BOOTING, RESUMABLE, CREATING = (
    "succeeded",
    "failed",
    "running",
    "booting",
    "resumable",
    "creating",
)


def recipe_key(
    s: LaunchSettings,
    step_key: str,
    partition: str | None,
    run_config: dict[str, Any] | None,
    bundle: str,
) -> str:
    """The index key of one piece of work: step, partition and a hash of its recipe."""
    op = step_key.split("[", 1)[0]
    ops = ((run_config or {}).get("ops") or {}).get(op)
    exp_file = ""
    if s.experiment_file and Path(s.experiment_file).is_file():
        exp_file = hashlib.sha256(Path(s.experiment_file).read_bytes()).hexdigest()
    facts = {
        "experiment": s.experiment,
        "step": step_key,
        "partition": partition,
        "op_config": ops,
        "experiment_file": exp_file,
        "bundle": bundle,
    }
    h = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()
    part = safe_step_key(partition or "none")[:60]
    return f"{safe_step_key(step_key)[:60]}/{part}-{h[:16]}"


class InflightIndex:
    def __init__(self, gcs: Gcs, staging: str):
        self.gcs, self.root = gcs, f"{staging.rstrip('/')}/{protocol.INFLIGHT_DIR}"

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}.json"

    def read(self, key: str) -> tuple[dict[str, Any] | None, int]:
        return objects.read_json_gen(self.gcs, self.uri(key))

    def create(self, key: str, rec: dict[str, Any]) -> bool:
        return objects.create_json(self.gcs, self.uri(key), rec)

    def replace(self, key: str, rec: dict[str, Any], generation: int) -> bool:
        return objects.put_json(self.gcs, self.uri(key), rec, generation)

    def update(self, key: str, owner: str, **changes: Any) -> bool:
        """The owner's write (new attempt, its VM); False when another launcher owns it now."""
        for _ in range(5):
            rec, gen = self.read(key)
            if rec is None or rec.get("owner") != owner:
                return False
            if self.replace(key, {**rec, **changes, "t": time.time()}, gen):
                return True
        return False

    def remove(self, key: str, owner: str | None = None) -> None:
        rec, gen = self.read(key)
        if rec is not None and (owner is None or rec.get("owner") == owner):
            objects.delete(self.gcs, self.uri(key), gen)


def step_succeeded(gcs: Gcs, launch_uri: str, attempt: int) -> bool:
    """Whether the attempt's event stream holds the step's STEP_SUCCESS."""
    prefix = protocol.attempt_prefix(launch_uri, attempt)
    decoder = EventDecoder()
    for data in ChunkReader(gcs, f"{prefix}/{protocol.EVENTS_DIR}", "jsonl").poll():
        for entry in decoder.feed(data):
            ev = entry.dagster_event if entry.is_dagster_event else None
            if ev is not None and ev.event_type == DagsterEventType.STEP_SUCCESS:
                return True
    return False


def launch_state(
    gcs: Gcs, rec: dict[str, Any], s: LaunchSettings, owner_live: bool, now: float | None = None
) -> str:
    """What an indexed launch is doing now (see the module's docstring)."""
    now = now or time.time()
    attempt = int(rec.get("attempt") or 0)
    if not attempt or not rec.get("vm"):
        fresh = now - float(rec.get("t", 0)) < s.boot_timeout_s
        return CREATING if owner_live and fresh else RESUMABLE
    launch = rec["launch_uri"]
    status = gcs.read_json(f"{protocol.attempt_prefix(launch, attempt)}/{protocol.STATUS_FILE}")
    if status is None:
        booting = now - float(rec.get("vm_started_at", 0)) < s.boot_timeout_s
        return BOOTING if booting else RESUMABLE
    state = status.get("state")
    if state == "exited":
        return SUCCEEDED if step_succeeded(gcs, launch, attempt) else FAILED
    if state == "failed":
        return FAILED
    if state == "preempted":
        return RESUMABLE
    if now - float(status.get("t", 0)) > s.heartbeat_timeout_s:
        return RESUMABLE  # the agent stopped beating: the VM is lost
    return RUNNING


def for_run(entry: EventLogEntry, step_context: StepExecutionContext) -> EventLogEntry:
    """`entry` as an event of this run: a launch started by an earlier run (a killed
    orchestrator's) relays its events into the run that re-attached to it."""
    run_id = step_context.run_id
    if entry.run_id == run_id:
        return entry
    job = step_context.job_name
    ev = entry.dagster_event
    if ev is not None:
        tags = dict(ev.logging_tags or {})
        if "run_id" in tags:
            tags["run_id"] = run_id
        if "job_name" in tags:
            tags["job_name"] = job
        ev = ev._replace(job_name=job, logging_tags=tags)
    return entry._replace(run_id=run_id, job_name=job, dagster_event=ev)


def events_of(gcs: Gcs, launch_uri: str, attempt: int) -> Iterator[EventLogEntry]:
    prefix = protocol.attempt_prefix(launch_uri, attempt)
    decoder = EventDecoder()
    for data in ChunkReader(gcs, f"{prefix}/{protocol.EVENTS_DIR}", "jsonl").poll():
        yield from decoder.feed(data)
