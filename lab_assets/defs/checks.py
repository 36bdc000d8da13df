"""The asset checks: `manifest_intact` on every asset, `beats_base_heldout` on adapters.

Each asset yields the manifest check's result right after its output, so the check
re-reads what the IO manager stored and compares each file's size and sha256 with
the partition's manifest. An adapter also says (WARN severity: a science warning,
not a broken artifact) whether it beat its base on held-out prompts.
"""

from __future__ import annotations

from typing import Any

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from lab_assets.defs.metadata import sig
from resources.io_manager import LabStorage

MANIFEST_INTACT = "manifest_intact"
BEATS_BASE_HELDOUT = "beats_base_heldout"


def manifest_check_specs(asset_name: str) -> list[AssetCheckSpec]:
    """The check spec to pass as an asset's ``check_specs``."""
    return [
        AssetCheckSpec(
            MANIFEST_INTACT,
            asset=asset_name,
            description="every stored file matches the partition manifest (size and sha256)",
        )
    ]


def manifest_check_result(
    storage: LabStorage, asset_name: str, partition: str | None
) -> AssetCheckResult:
    """Verify the stored partition against its manifest (an ERROR-severity result)."""
    problems = storage.store.verify(asset_name, partition)
    return AssetCheckResult(
        check_name=MANIFEST_INTACT,
        passed=not problems,
        severity=AssetCheckSeverity.ERROR,
        metadata={"problems": MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none")},
    )


def heldout_check_spec(asset_name: str) -> AssetCheckSpec:
    """The adapter's held-out check spec (see ``heldout_check_result``)."""
    return AssetCheckSpec(
        BEATS_BASE_HELDOUT,
        asset=asset_name,
        description=(
            "on held-out prompts the adapter beats its base: SFT on the task metric "
            "(exact match / accuracy), DPO on preference accuracy (a WARN: controls such "
            "as DPO on shuffled preferences are expected to fail it)"
        ),
    )


def heldout_check_result(evaluation: dict[str, Any]) -> AssetCheckResult:
    """A WARN-severity result from a ``HeldoutEval.to_dict()``."""
    keys = (
        "base_task_metric",
        "task_metric",
        "base_pref_accuracy",
        "pref_accuracy",
        "reward_accuracy",
        "reward_margin",
    )
    return AssetCheckResult(
        check_name=BEATS_BASE_HELDOUT,
        passed=bool(evaluation["beats_base"]),
        severity=AssetCheckSeverity.WARN,
        metadata={k: MetadataValue.float(sig(float(evaluation[k]))) for k in keys}
        | {"n_heldout": MetadataValue.int(int(evaluation["n"]))},
    )
