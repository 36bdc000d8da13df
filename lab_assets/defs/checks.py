"""The `manifest_intact` asset check every asset carries.

Each asset yields the check's result right after its output, so the check re-reads
what the IO manager stored and compares each file's size and sha256 with the
partition's manifest.
"""

from __future__ import annotations

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from resources.io_manager import LabStorage

MANIFEST_INTACT = "manifest_intact"


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
