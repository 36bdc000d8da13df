"""Where a VM may go: the (zone, machine type) candidates for a GPU, and failover across them.

The experiment names its allowed zones in preference order and may carry a
registry ``gpu_zones: {gpu_type: {zone: [machine types]}}`` saying which machine
types can host that GPU in which zone. Candidates are the allowed zones that the
registry lists for the GPU, each with its machine types (the configured machine
type first); without a registry entry, every allowed zone with the configured
machine type. ``fallback_gpu_types`` (each with its registry entry) follow, e.g. an
A100 after every L4 candidate. A candidate's GPU count is the machine type's own
where it has one (``catalog.fixed_gpus``: ``g2-standard-24`` gets 2 L4s whatever
``gpu_count`` says), else the configured ``gpu_count``. Per-run overrides (run
config or ``LAB_GCE_ZONE``, ``LAB_GCE_MACHINE_TYPE``, ``LAB_GCE_GPU_TYPE``) narrow
or change the choice. When a zone has no capacity or quota the next candidate is
tried; after a preemption the zone that was just preempted goes to the back of
its GPU's line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from resources.compute.gce.catalog import gpu_count_for
from resources.compute.gce.errors import CapacityError

ZONE_ENV = "LAB_GCE_ZONE"
MACHINE_TYPE_ENV = "LAB_GCE_MACHINE_TYPE"
GPU_TYPE_ENV = "LAB_GCE_GPU_TYPE"


@dataclass(frozen=True)
class Placement:
    zone: str
    machine_type: str
    gpu_type: str
    gpu_count: int


@dataclass(frozen=True)
class Overrides:
    zone: str | None = None
    machine_type: str | None = None
    gpu_type: str | None = None

    @classmethod
    def resolve(
        cls, zone: str | None = None, machine_type: str | None = None, gpu_type: str | None = None
    ) -> Overrides:
        """Explicit values (run config) win over the environment variables."""
        return cls(
            zone=zone or os.environ.get(ZONE_ENV) or None,
            machine_type=machine_type or os.environ.get(MACHINE_TYPE_ENV) or None,
            gpu_type=gpu_type or os.environ.get(GPU_TYPE_ENV) or None,
        )


class NoCapacityError(RuntimeError):
    """Every candidate zone / machine type was out of capacity or quota."""

    def __init__(self, failures: Sequence[tuple[Placement, str]]):
        lines = [f"  {p.zone} {p.machine_type} {p.gpu_type}: {why}" for p, why in failures]
        super().__init__("no zone had capacity for the VM:\n" + "\n".join(lines))
        self.failures = list(failures)


def candidates(
    zones: Sequence[str],
    machine_type: str,
    gpu_type: str,
    gpu_count: int,
    gpu_zones: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    overrides: Overrides = Overrides(),
    avoid: Sequence[str] = (),
    fallback_gpu_types: Sequence[str] = (),
) -> list[Placement]:
    """Every (zone, machine type, GPU, count) to try, in order: the GPU's, then each fallback's."""
    # An overridden GPU or machine type is the user's one choice: no fallback GPUs then.
    if overrides.gpu_type or overrides.machine_type:
        gpus = [overrides.gpu_type or gpu_type]
    else:
        gpus = [gpu_type, *fallback_gpu_types]
    out: list[Placement] = []
    for i, gpu in enumerate(gpus):
        group = _for_gpu(zones, machine_type, gpu, gpu_count, gpu_zones, overrides, primary=i == 0)
        # Zones just preempted go last (capacity there is under pressure).
        out += [p for p in group if p.zone not in avoid] + [p for p in group if p.zone in avoid]
    if not out:
        allowed = [overrides.zone] if overrides.zone else list(zones)
        raise ValueError(
            f"no allowed zone hosts GPU {gpus[0]!r}: zones {allowed}, registry "
            f"{dict((gpu_zones or {}).get(gpus[0]) or {})}"
        )
    return out


def _for_gpu(
    zones: Sequence[str],
    machine_type: str,
    gpu: str,
    gpu_count: int,
    gpu_zones: Mapping[str, Mapping[str, Sequence[str]]] | None,
    overrides: Overrides,
    primary: bool,
) -> list[Placement]:
    registry = (gpu_zones or {}).get(gpu)
    if registry is None and not primary:
        return []  # a fallback GPU needs its machine types named in the registry
    allowed = [overrides.zone] if overrides.zone else list(zones)
    out: list[Placement] = []
    for zone in allowed:
        if registry is not None:
            if zone not in registry and not overrides.zone:
                continue
            types = list(registry.get(zone) or ([machine_type] if primary else []))
            if machine_type in types:
                types.remove(machine_type)
                types.insert(0, machine_type)
        else:
            types = [machine_type]
        if overrides.machine_type:
            types = [overrides.machine_type]
        out.extend(Placement(zone, m, gpu, gpu_count_for(m, gpu, gpu_count)) for m in types)
    return out


@dataclass
class FailoverResult:
    placement: Placement
    failures: list[tuple[Placement, str]] = field(default_factory=list)


def create_with_failover(
    placements: Sequence[Placement],
    create: Callable[[Placement], None],
    log: Callable[[str], None] = lambda _m: None,
) -> FailoverResult:
    """Call `create` on each candidate until one is not refused for capacity."""
    failures: list[tuple[Placement, str]] = []
    for p in placements:
        try:
            create(p)
        except CapacityError as e:
            log(f"no capacity in {p.zone} for {p.machine_type} + {p.gpu_type}: {e.code}; next")
            failures.append((p, f"{e.code}: {e}"))
            continue
        return FailoverResult(p, failures)
    raise NoCapacityError(failures)
