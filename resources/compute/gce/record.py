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

    def summary(self, spot: bool) -> str:
        if not self.vms:
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
        if self.failovers:
            meta["gce/zones_without_capacity"] = ", ".join(self.failovers)
        return meta
