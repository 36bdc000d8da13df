"""What VMs cost: the price table, the cost ledger in GCS, and the budget check.

Prices come from the experiment's ``hourly_usd`` table, keyed by machine type and
by GPU type (per GPU); a ``<name>:spot`` key, when present, is the spot price.
A VM-hour costs ``machine + gpu_count x gpu``.

The ledger is one small JSON object per VM under ``<root>/<experiment>/_gce/ledger/``
(objects, not one shared file, so concurrent launches never race on a
read-modify-write). When a VM is created its entry holds the worst case (hourly
price x ``max_run_duration``, the dead-man switch's limit), so launches running
at the same time see each other's reservations and a crashed orchestrator's VM
stays counted; when the VM is gone the entry is rewritten with the actual cost.
Before every VM is created: spent so far + this VM's worst case must fit in
``budget.max_usd`` (0 means no budget), or the launch is refused with the numbers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from resources.compute.gce.gcs import Gcs


class PriceMissing(KeyError):
    pass


class BudgetExceeded(RuntimeError):
    """A launch would break the experiment's budget; the message has the numbers."""

    def __init__(self, spent: float, worst_case: float, max_usd: float, detail: str):
        super().__init__(
            f"budget refused: spent ${spent:.2f} so far + this VM's worst case "
            f"${worst_case:.2f} ({detail}) = ${spent + worst_case:.2f} > budget "
            f"${max_usd:.2f}"
        )
        self.spent, self.worst_case, self.max_usd = spent, worst_case, max_usd


def _price(prices: Mapping[str, float], name: str, spot: bool) -> float:
    if spot and f"{name}:spot" in prices:
        return float(prices[f"{name}:spot"])
    if name in prices:
        return float(prices[name])
    raise PriceMissing(f"no price for {name!r}{' (spot)' if spot else ''} in hourly_usd")


def hourly_price(
    prices: Mapping[str, float], machine_type: str, gpu_type: str | None, gpu_count: int, spot: bool
) -> float:
    total = _price(prices, machine_type, spot)
    if gpu_type and gpu_count:
        total += gpu_count * _price(prices, gpu_type, spot)
    return total


@dataclass
class CostLedger:
    gcs: Gcs
    uri: str  # gs://.../_gce/ledger

    def _entry_uri(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}.json"

    def entries(self) -> list[dict]:
        out = []
        for uri in self.gcs.list(self.uri):
            if uri.endswith(".json"):
                e = self.gcs.read_json(uri)
                if e:
                    out.append(e)
        return out

    def spent(self) -> float:
        return sum(float(e.get("cost_usd", 0.0)) for e in self.entries())

    def reserve(self, key: str, worst_case: float, **facts) -> None:
        self.gcs.write_json(
            self._entry_uri(key),
            {"state": "running", "cost_usd": worst_case, "reserved_at": time.time(), **facts},
        )

    def settle(self, key: str, cost_usd: float, vm_seconds: float, **facts) -> None:
        self.gcs.write_json(
            self._entry_uri(key),
            {
                "state": "settled",
                "cost_usd": cost_usd,
                "vm_seconds": vm_seconds,
                "settled_at": time.time(),
                **facts,
            },
        )


def check_budget(max_usd: float, spent: float, worst_case: float, detail: str) -> None:
    if max_usd > 0 and spent + worst_case > max_usd:
        raise BudgetExceeded(spent, worst_case, max_usd, detail)
