"""What happened to one step's launch: its VMs, preemptions and failovers, and their cost.

The attempt loop (``attempts``) and the stream follower (``follow``) fill in a
``LaunchRecord`` as the launch goes; the launcher turns it into the log line that
sums the launch up and into the metadata of the final asset observation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from resources.compute.gce.placement import Placement
from resources.remote.launch_info import as_metadata

BOOTED, REUSED, ATTACHED = "booted", "reused", "attached"


@dataclass
class Vm:
    """One VM as one step used it: from when the step got it (booted, claimed warm, or
    re-attached to) until the step was done with it."""

    name: str
    placement: Placement
    attempt: int
    hourly_usd: float | None
    started_at: float
    ended_at: float | None = None
    how: str = BOOTED  # BOOTED | REUSED (a warm VM) | ATTACHED (a launch already running)
    requested_at: float | None = None  # when the step asked for a VM
    first_event_at: float | None = None  # when its first event arrived
    created_at: float | None = None  # when the VM itself was created (its cost runs from then)
    ledger_key: str | None = None  # its entry in the cost ledger (reserved by its creator)

    @property
    def wait_s(self) -> float | None:
        """How long the step waited for this VM: request to its first event."""
        if self.requested_at is None or self.first_event_at is None:
            return None
        return max(0.0, self.first_event_at - self.requested_at)

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
    step_started: bool = False  # STEP_START relayed into this run (once, whatever the VMs)
    reused_launch: str | None = None  # outputs taken from this earlier launch, no VM

    @property
    def vm_seconds(self) -> float:
        return sum(v.seconds for v in self.vms)

    @property
    def cost(self) -> float | None:
        costs = [v.cost for v in self.vms]
        return None if any(c is None for c in costs) else sum(costs)  # type: ignore[arg-type]

    def summary(self, spot: bool) -> str:
        if not self.vms:
            if self.reused_launch:
                return f"no VM: the step had finished in an earlier launch ({self.reused_launch})"
            return "no VM created"
        last = self.vms[-1]
        cost = self.cost
        return (
            f"{len(self.vms)} VM(s), {self.vm_seconds:.0f} VM-seconds, last zone {last.zone} "
            f"({last.placement.machine_type} + {last.placement.gpu_count} x "
            f"{last.placement.gpu_type}, {'spot' if spot else 'on-demand'}), "
            f"{self.preemptions} preemption(s), "
            + (f"${cost:.4f}" if cost is not None else "cost unknown (no price)")
        )

    def final_metadata(self, spot: bool) -> dict[str, Any]:
        if not self.vms:
            return {"gce/vm": "none", "gce/outputs_from_launch": self.reused_launch or ""}
        last = self.vms[-1]
        info = {
            "vm_name": last.name,
            "zone": last.zone,
            "machine_type": last.placement.machine_type,
            "gpu_type": last.placement.gpu_type,
            "gpu_count": last.placement.gpu_count,
            "spot": spot,
            "hourly_usd": last.hourly_usd,
            "preemptions": self.preemptions,
        }
        meta = as_metadata(info, vm_seconds=self.vm_seconds, cost_usd=self.cost)
        meta["gce/zones_used"] = ", ".join(v.zone for v in self.vms)
        meta["gce/vm"] = ", ".join(v.how for v in self.vms)
        waits = [v.wait_s for v in self.vms if v.wait_s is not None]
        if waits:
            meta["gce/vm_wait_s"] = round(sum(waits), 2)
        if self.failovers:
            meta["gce/zones_without_capacity"] = ", ".join(self.failovers)
        return meta
