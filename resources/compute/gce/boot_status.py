"""A VM's first boot as the launcher sees it: the bootstrap's phases, its failure, the console.

Before the agent writes its first status, the VM's startup script reports each
bootstrap phase (``resources/remote/vm_boot.py``) to ``<attempt>/boot.json``: which
phases started, finished or were skipped, and for a failed one the tail of its
output. ``BootWatch`` reads it while the follower waits for the agent, logs each
phase once as it arrives, and turns a failure into the step's failure at once
(``bootstrap failed: <phase>: <tail>``) instead of after ``boot_timeout_s``. When no
agent status ever arrives, ``serial_tail`` gives the end of the VM's serial console
(``instances.getSerialPortOutput``) for the error message: what the startup script,
the agent's unit or the kernel said last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resources.compute.gce.vm_spec import DEFAULT_LAB_HOME
from resources.compute.local.launcher import StepWorkerError

if TYPE_CHECKING:
    from resources.compute.gce.api import ComputeApi
    from resources.compute.gce.gcs import Gcs
    from resources.compute.gce.record import Vm

SERIAL_TAIL_BYTES = 16 * 1024
SERIAL_TAIL_LINES = 40


class BootFailed(StepWorkerError):
    """The VM's bootstrap reported a failed phase."""


class BootWatch:
    """Follows one VM attempt's ``boot.json`` until the agent reports (see the module doc)."""

    def __init__(self, gcs: Gcs, uri: str, api: ComputeApi, vm: Vm, log: Any):
        self.gcs, self.uri, self.api, self.vm, self.log = gcs, uri, api, vm, log
        self.seen: set[tuple[str, str]] = set()
        self.done = False

    def poll(self, agent_status: dict[str, Any] | None) -> None:
        """Log phases not logged yet; raise ``BootFailed`` for a failed one. Once the agent
        has reported, one last read and no more."""
        if self.done:
            return
        if agent_status is not None:
            self.done = True
        try:
            rec = self.gcs.read_json(self.uri)
        except Exception as e:  # noqa: BLE001 - the agent's status and the timeout still rule
            self.log.debug(f"[{self.vm.name}] boot report unreadable: {e}")
            return
        if not rec:
            return
        for p in rec.get("phases") or []:
            key = (str(p.get("name")), str(p.get("state")))
            if key in self.seen:
                continue
            self.seen.add(key)
            detail = f": {p['detail']}" if p.get("detail") else ""
            took = f" after {p['seconds']:.0f}s" if p.get("state") != "start" else ""
            say = self.log.debug if p.get("state") == "start" else self.log.info
            say(f"[{self.vm.name}] boot: {key[0]} {p.get('state')}{took}{detail}")
        failed = rec.get("failed")
        if rec.get("state") == "failed" and failed:
            self.done = True
            raise BootFailed(
                f"bootstrap failed: {failed.get('phase')}: "
                f"{(failed.get('tail') or failed.get('detail') or '').strip()}\n"
                f"(VM {self.vm.name} in {self.vm.zone}; every phase's output is on its serial "
                f"console and under {DEFAULT_LAB_HOME}/boot/)"
            )

    def serial_tail(self) -> str:
        """The last lines of the VM's serial console, or why they cannot be had."""
        try:
            text = self.api.serial_port_output(self.vm.zone, self.vm.name, start=-SERIAL_TAIL_BYTES)
        except Exception as e:  # noqa: BLE001 - an error message is being built
            return f"(its serial console could not be read: {e})"
        lines = text.splitlines()[-SERIAL_TAIL_LINES:]
        if not lines:
            return "(its serial console is empty)"
        return "its serial console ends:\n" + "\n".join(lines)
