"""What VMs cost: the price table, the cost ledger in GCS, and the budget check.

Prices come from the dated catalog (``catalog``), per zone, spot or on-demand; the
experiment's ``hourly_usd`` may override any of them (keyed by machine type and by
GPU type, per GPU; a ``<name>:spot`` key is the spot price). A VM-hour costs
``machine + gpu_count x gpu``.

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
from dataclasses import dataclass

from resources.compute.gce.catalog import PriceMissing, hourly_price
from resources.compute.gce.gcs import Gcs

__all__ = ["BudgetExceeded", "CostLedger", "PriceMissing", "check_budget", "hourly_price"]


class BudgetExceeded(RuntimeError):
    """A launch would break the experiment's budget; the message has the numbers."""

    def __init__(self, spent: float, worst_case: float, max_usd: float, detail: str):
        super().__init__(
            f"budget refused: spent ${spent:.2f} so far + this VM's worst case "
            f"${worst_case:.2f} ({detail}) = ${spent + worst_case:.2f} > budget "
            f"${max_usd:.2f}"
        )
        self.spent, self.worst_case, self.max_usd = spent, worst_case, max_usd


@dataclass
class CostLedger:
    gcs: Gcs
    uri: str  # gs://.../_gce/ledger

    def entry_uri(self, key: str) -> str:
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
            self.entry_uri(key),
            {"state": "running", "cost_usd": worst_case, "reserved_at": time.time(), **facts},
        )

    def settle(self, key: str, cost_usd: float, vm_seconds: float, **facts) -> None:
        self.gcs.write_json(
            self.entry_uri(key),
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
