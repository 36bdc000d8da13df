"""Following one VM attempt: relay its events and logs into the run until the step ends.

Under the attempt's prefix (``protocol.attempt_prefix``) the agent on the VM writes
two chunk streams (Dagster events as JSON lines, the worker's output as text) and a
status file carrying its state and a heartbeat. ``VmFollower`` polls them, hands
each event to the Dagster instance as it arrives, and decides how the attempt
ended: ``ENDED`` (the step's own terminal event arrived), ``PREEMPTED`` (a spot
preemption, confirmed by the agent or the Compute Engine API), or an error naming
what went wrong (the agent never reported, its heartbeat stopped, the VM went away)
with the worker's last output lines.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.execution.context.system import StepExecutionContext

from resources.compute.events import EventDecoder, is_terminal
from resources.compute.gce.boot_status import BootWatch
from resources.compute.gce.chunks import ChunkReader
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.inflight import for_run
from resources.compute.gce.record import LaunchRecord, Vm
from resources.compute.gce.settings import LaunchSettings
from resources.compute.local.launcher import StepWorkerError, describe_exit
from resources.compute.worker_lines import WorkerLines
from resources.remote import protocol

if TYPE_CHECKING:
    from resources.compute.gce.api import ComputeApi

ENDED = "ended"
PREEMPTED = "preempted"
_AGENT_DONE = ("exited", "failed", "preempted")  # the agent's final states
_VM_GONE = ("STOPPING", "TERMINATED", "SUSPENDED")


class VmFollower:
    """Relays one VM attempt's events and logs; ``follow()`` returns how the attempt ended."""

    def __init__(
        self,
        settings: LaunchSettings,
        api: ComputeApi,
        gcs: Gcs,
        step_context: StepExecutionContext,
        record: LaunchRecord,
        vm: Vm,
        launch_uri: str,
    ):
        self.s, self.api, self.gcs = settings, api, gcs
        self.step_context, self.record, self.vm = step_context, record, vm
        prefix = protocol.attempt_prefix(launch_uri, vm.attempt)
        self.status_uri = f"{prefix}/{protocol.STATUS_FILE}"
        # the bootstrap's phases until the agent reports; its failure ends the step at once
        self.boot = BootWatch(gcs, f"{prefix}/{protocol.BOOT_FILE}", api, vm, step_context.log)
        self.events = ChunkReader(gcs, f"{prefix}/{protocol.EVENTS_DIR}", "jsonl")
        self.logs = ChunkReader(gcs, f"{prefix}/{protocol.LOGS_DIR}", "txt")
        self.decoder = EventDecoder()
        self.lines = WorkerLines()
        self.recent: collections.deque[str] = collections.deque(maxlen=40)
        self.ended = False

    def follow(self) -> Generator[DagsterEvent, None, str]:
        """Relay until the step ends (``ENDED``) or the VM is preempted (``PREEMPTED``);
        anything else raises."""
        s = self.s
        last_check = time.time()
        while True:
            yield from self.relay()
            if self.ended:
                yield from self._drain()
                return ENDED
            status = self._status()
            if (status or {}).get("state") in _AGENT_DONE:
                return (yield from self._agent_done(status or {}))
            self.boot.poll(status)
            now = time.time()
            self._check_alive(status, now)
            if now - last_check >= s.instance_check_s:
                last_check = now
                outcome = yield from self._check_instance()
                if outcome is not None:
                    return outcome
            time.sleep(s.poll_interval_s)

    def relay(self) -> Iterator[DagsterEvent]:
        """Everything new in the two streams: events into the run, each output line once, at
        its own level (``WorkerLines``: echoes of Dagster log events are dropped)."""
        for data in self.events.poll():
            for raw in self.decoder.feed(data):
                entry = for_run(raw, self.step_context)  # an earlier run's launch, re-attached
                ev = entry.dagster_event if entry.is_dagster_event else None
                if (
                    self.record.step_started
                    and ev is not None
                    and ev.event_type == DagsterEventType.STEP_START
                ):
                    continue  # the step started once already in this run, on an earlier VM
                self.step_context.instance.handle_new_event(entry)
                self.ended = self.ended or is_terminal(entry)
                if ev is not None:
                    self._note(ev)
                    yield ev
        for data in self.logs.poll():
            for line in data.decode("utf-8", "replace").splitlines():
                self.recent.append(line)
                level = self.lines.level(line)
                if level is not None:
                    self.step_context.log.log(level, f"[{self.vm.name}] {line}")

    def _note(self, ev: DagsterEvent) -> None:
        if self.vm.first_event_at is None:
            self.vm.first_event_at = time.time()
        if ev.event_type == DagsterEventType.STEP_START:
            self.record.step_started = True
        if ev.event_type == DagsterEventType.STEP_SUCCESS:
            self.record.step_succeeded = True
        if ev.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            m = ev.step_materialization_data.materialization
            self.record.materialized.append((m.asset_key, m.partition))

    def _status(self) -> dict[str, Any] | None:
        return self.gcs.read_json(self.status_uri)

    def _drain(self) -> Iterator[DagsterEvent]:
        """After the step's last event: the agent ships the worker's last output lines."""
        s = self.s
        deadline = time.time() + 3 * s.flush_interval_s + s.poll_interval_s
        while time.time() < deadline:
            status = self._status() or {}
            yield from self.relay()
            if status.get("state") in _AGENT_DONE:
                break
            time.sleep(s.poll_interval_s)

    def _agent_done(self, status: dict[str, Any]) -> Generator[DagsterEvent, None, str]:
        """The agent wrote its final status; it flushed everything before doing so."""
        yield from self.relay()
        if self.ended:
            return ENDED
        state = status.get("state")
        if state == "preempted" and (status.get("confirmed") or self._preempted()):
            return PREEMPTED
        code = status.get("returncode")
        detail = status.get("error") or (
            describe_exit(int(code)) if isinstance(code, int) else f"code {code}"
        )
        how = detail if state == "exited" and not status.get("error") else f"{state}, {detail}"
        raise StepWorkerError(
            f"step on VM {self.vm.name} ended ({how}) before the step ended; "
            "its last output:\n" + self._last_output()
        )

    def _check_alive(self, status: dict[str, Any] | None, now: float) -> None:
        """Raise when the agent never reported in, or its heartbeat stopped."""
        s, vm = self.s, self.vm
        if status is None and now - vm.started_at > s.boot_timeout_s:
            raise StepWorkerError(
                f"VM {vm.name}: the agent never reported in {s.boot_timeout_s:.0f}s "
                f"(see its serial console: gcloud compute instances get-serial-port-output "
                f"{vm.name} --zone {vm.zone} --project {s.project}); " + self.boot.serial_tail()
            )
        if status is not None and now - float(status.get("t", now)) > s.heartbeat_timeout_s:
            raise StepWorkerError(
                f"VM {vm.name}: no heartbeat from the agent for {s.heartbeat_timeout_s:.0f}s; "
                "last output:\n" + self._last_output()
            )

    def _check_instance(self) -> Generator[DagsterEvent, None, str | None]:
        """Ask Compute Engine whether the VM still runs; None when it does."""
        s, vm = self.s, self.vm
        inst = self.api.get_instance(vm.zone, vm.name)
        if inst is not None and inst.status not in _VM_GONE:
            return None
        time.sleep(s.poll_interval_s)  # let a final status land
        yield from self.relay()
        if self.ended:
            return ENDED
        status = self._status() or {}
        if status.get("state") == "preempted" or self._preempted():
            return PREEMPTED
        gone = "was deleted" if inst is None else f"is {inst.status}"
        if vm.seconds >= s.max_run_duration_s:
            gone += f" (maxRunDuration {s.max_run_duration_s}s reached)"
        raise StepWorkerError(
            f"VM {vm.name} {gone} before the step ended; last output:\n" + self._last_output()
        )

    def _preempted(self) -> bool:
        return self.s.spot and self.api.was_preempted(self.vm.zone, self.vm.name)

    def _last_output(self) -> str:
        return "\n".join(self.recent)
