"""What GCE sells, and at what price: the dated catalog the launcher prices and places VMs from.

Prices are not typed by hand into each experiment: they come from
``gcp_catalog.csv`` next to this module, a trimmed copy of SkyPilot's public GCP
catalog (its header names the source, the commit and the date; refresh it with
``scripts/refresh_gcp_catalog.py``). A machine-type row prices the VM without its
GPUs, a GPU row prices one GPU; a VM-hour costs ``machine + gpu_count x gpu``, spot
or on-demand, in the VM's zone.

What a machine type carries is a fact of GCE, not of the price list: A2, A3 and G2
machine types come with a fixed GPU type and count (``g2-standard-24`` has two L4s;
asking for one is a 400), so ``fixed_gpus`` says it and the placement follows it.
N1 machine types take GPUs attached by count (``fixed_gpus`` is None). The same
table serves the fake Compute Engine in the tests, so the fake refuses what GCE
refuses.

Stdlib only and cheap to import: experiment validation and ``lab launch --dry-run``
use it with no credentials and no network.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

CATALOG_FILE = Path(__file__).with_name("gcp_catalog.csv")

# SkyPilot's accelerator names -> GCE accelerator types.
GPU_TYPES = {
    "L4": "nvidia-l4",
    "A100": "nvidia-tesla-a100",
    "A100-80GB": "nvidia-a100-80gb",
    "H100": "nvidia-h100-80gb",
    "T4": "nvidia-tesla-t4",
}

# Machine types with built-in GPUs (GCE documentation: accelerator-optimized machines).
_L4, _A100, _A100_80, _H100 = (
    GPU_TYPES["L4"],
    GPU_TYPES["A100"],
    "nvidia-a100-80gb",
    GPU_TYPES["H100"],
)
FIXED_GPUS: dict[str, tuple[str, int]] = {
    "g2-standard-4": (_L4, 1),
    "g2-standard-8": (_L4, 1),
    "g2-standard-12": (_L4, 1),
    "g2-standard-16": (_L4, 1),
    "g2-standard-24": (_L4, 2),
    "g2-standard-32": (_L4, 1),
    "g2-standard-48": (_L4, 4),
    "g2-standard-96": (_L4, 8),
    "a2-highgpu-1g": (_A100, 1),
    "a2-highgpu-2g": (_A100, 2),
    "a2-highgpu-4g": (_A100, 4),
    "a2-highgpu-8g": (_A100, 8),
    "a2-megagpu-16g": (_A100, 16),
    "a2-ultragpu-1g": (_A100_80, 1),
    "a2-ultragpu-2g": (_A100_80, 2),
    "a2-ultragpu-4g": (_A100_80, 4),
    "a2-ultragpu-8g": (_A100_80, 8),
    "a3-highgpu-1g": (_H100, 1),
    "a3-highgpu-2g": (_H100, 2),
    "a3-highgpu-4g": (_H100, 4),
    "a3-highgpu-8g": (_H100, 8),
}
# Machine types the lab uses without a GPU (the image exporter), known though not priced here.
CPU_ONLY = frozenset({"e2-standard-2", "e2-standard-4", "e2-standard-8"})


class PriceMissing(KeyError):
    """No price for a machine type or GPU in a zone (neither in the catalog nor overridden)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Price:
    on_demand: float | None
    spot: float | None

    def get(self, spot: bool) -> float | None:
        return self.spot if spot else self.on_demand


@dataclass
class Catalog:
    """Prices by (machine type or GPU type, zone), and where each is offered."""

    source: str = ""  # "<file> (from <url>, vendored <date>)"
    machines: dict[tuple[str, str], Price] = field(default_factory=dict)
    gpus: dict[tuple[str, str], Price] = field(default_factory=dict)  # one GPU

    @classmethod
    def read(cls, path: Path = CATALOG_FILE) -> Catalog:
        lines = path.read_text().splitlines()
        header = [ln[1:].strip() for ln in lines if ln.startswith("#")]
        url = next((h.split(":", 1)[1].strip() for h in header if h.startswith("source:")), "")
        date = next((h.split("vendored:", 1)[1].strip() for h in header if "vendored:" in h), "")
        cat = cls(source=f"{path.name} (from {url or 'unknown'}, vendored {date or '?'})")
        for row in csv.DictReader(ln for ln in lines if ln and not ln.startswith("#")):
            zone = row["AvailabilityZone"]
            price = Price(_num(row["Price"]), _num(row["SpotPrice"]))
            if row["InstanceType"]:
                cat.machines[(row["InstanceType"], zone)] = price
            elif row["AcceleratorName"] in GPU_TYPES and row["AcceleratorCount"] in ("1", "1.0"):
                cat.gpus[(GPU_TYPES[row["AcceleratorName"]], zone)] = price
        return cat

    # -- what exists --------------------------------------------------------------------

    @property
    def zones(self) -> frozenset[str]:
        return frozenset(z for _, z in self.machines) | frozenset(z for _, z in self.gpus)

    def machine_types(self) -> frozenset[str]:
        return frozenset(m for m, _ in self.machines) | frozenset(FIXED_GPUS) | CPU_ONLY

    def gpu_types(self) -> frozenset[str]:
        return frozenset(g for g, _ in self.gpus) | frozenset(GPU_TYPES.values())

    def zones_for(self, machine_type: str, gpu_type: str | None = None) -> list[str]:
        """Zones (sorted) whose catalog rows offer `machine_type` (and `gpu_type`, if given)."""
        zs = {z for m, z in self.machines if m == machine_type}
        if gpu_type:
            zs &= {z for g, z in self.gpus if g == gpu_type}
        return sorted(zs)

    def offers(self, machine_type: str, zone: str) -> bool | None:
        """Whether `zone` has `machine_type`; None when the catalog does not list the type."""
        if not any(m == machine_type for m, _ in self.machines):
            return None
        return (machine_type, zone) in self.machines

    # -- prices ---------------------------------------------------------------------------

    def machine_price(self, machine_type: str, zone: str, spot: bool) -> float:
        return _lookup(self.machines, machine_type, zone, spot, "machine type")

    def gpu_price(self, gpu_type: str, zone: str, spot: bool) -> float:
        return _lookup(self.gpus, gpu_type, zone, spot, "GPU")


def _num(s: str) -> float | None:
    try:
        return float(s) if s.strip() else None
    except ValueError:
        return None


def _lookup(table: dict[tuple[str, str], Price], name: str, zone: str, spot: bool, what: str):
    p = table.get((name, zone))
    value = p.get(spot) if p else None
    if value is None:
        raise PriceMissing(
            f"no {'spot' if spot else 'on-demand'} price for {what} {name!r} in {zone} "
            f"in the catalog ({CATALOG_FILE.name}); set compute.hourly_usd[{name!r}]"
        )
    return value


@functools.cache
def default_catalog() -> Catalog:
    """The vendored catalog, read once per process."""
    return Catalog.read()


def fixed_gpus(machine_type: str) -> tuple[str, int] | None:
    """(GPU type, count) built into `machine_type` (A2, A3, G2), else None (GPUs attach)."""
    return FIXED_GPUS.get(machine_type)


def gpu_count_for(machine_type: str, gpu_type: str, configured: int) -> int:
    """How many GPUs a VM of `machine_type` gets: the machine's own count where it has one."""
    fixed = fixed_gpus(machine_type)
    return fixed[1] if fixed and fixed[0] == gpu_type else configured


def mismatched(machine_types: Iterable[str], gpu_type: str) -> list[str]:
    """Machine types whose built-in GPU is not `gpu_type` (they cannot host it)."""
    return [m for m in machine_types if (f := fixed_gpus(m)) is not None and f[0] != gpu_type]


def hourly_price(
    overrides: dict[str, float],
    machine_type: str,
    zone: str,
    gpu_type: str | None,
    gpu_count: int,
    spot: bool,
    catalog: Catalog | None = None,
) -> float:
    """machine + gpu_count x gpu per hour; each part from `overrides` (keys: the name, or
    ``NAME:spot`` for the spot price) if there, else from the catalog for `zone`."""
    cat = catalog or default_catalog()

    def part(name: str, from_catalog) -> float:
        if spot and f"{name}:spot" in overrides:
            return float(overrides[f"{name}:spot"])
        if name in overrides:
            return float(overrides[name])
        return from_catalog(name, zone, spot)

    total = part(machine_type, cat.machine_price)
    if gpu_type and gpu_count:
        total += gpu_count * part(gpu_type, cat.gpu_price)
    return total
