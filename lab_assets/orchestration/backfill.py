"""One `lab` invocation = one Dagster asset backfill of exactly the partitions it needs.

The backfill is written to the instance like one launched from the UI (it shows in
the Backfills tab with its title and tags); the daemon's backfill loop then submits
runs to the run queue in dependency order, one run per partition of each asset group
(base model + its spectrum; adapter + its spectral features; the classification),
and the queue launches them as the pools allow.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from dagster import AssetKey, DagsterInstance
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.execution.backfill import PartitionBackfill
from dagster._core.utils import make_new_backfill_id

from lab_assets.defs.partitions import build_partitions
from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.versions import ASSET_ORDER, all_partitions
from lab_assets.names import (
    ADAPTER,
    BASE_MODEL,
    BASE_SPECTRUM,
    INVOCATION_TAG,
    SPECTRAL_FEATURES,
)
from lab_assets.orchestration.recovery import owner_tags

AssetPartition = tuple[str, str | None]


def every_partition(exp: Experiment) -> list[AssetPartition]:
    """All (asset, partition) pairs of the experiment, upstream first."""
    return [(asset, p) for asset in ASSET_ORDER for p in all_partitions(exp, asset)]


def asset_graph_subset(exp: Experiment, targets: Iterable[AssetPartition]) -> AssetGraphSubset:
    parts = build_partitions(exp)
    defs_by_asset = {
        BASE_MODEL: parts.models,
        BASE_SPECTRUM: parts.models,
        ADAPTER: parts.adapters,
        SPECTRAL_FEATURES: parts.adapters,
    }
    keys: dict[str, list[str]] = {}
    unpartitioned: set[AssetKey] = set()
    for asset, partition in targets:
        if partition is None:
            unpartitioned.add(AssetKey(exp.key_path(asset)))
        else:
            keys.setdefault(asset, []).append(partition)
    return AssetGraphSubset(
        partitions_subsets_by_asset_key={
            AssetKey(exp.key_path(a)): defs_by_asset[a].subset_with_partition_keys(ks)
            for a, ks in keys.items()
        },
        non_partitioned_asset_keys=unpartitioned,
    )


def submit_backfill(
    instance: DagsterInstance,
    exp: Experiment,
    targets: list[AssetPartition],
    title: str,
    tags: dict[str, str] | None = None,
    run_config: dict | None = None,
) -> str:
    """Add a backfill of exactly `targets` to the instance; the daemon runs it. Returns its id."""
    backfill = PartitionBackfill.from_asset_graph_subset(
        backfill_id=make_new_backfill_id(),
        backfill_timestamp=time.time(),
        tags={INVOCATION_TAG: title.split(":", 1)[0], **owner_tags(), **(tags or {})},
        dynamic_partitions_store=instance,
        asset_graph_subset=asset_graph_subset(exp, targets),
        title=title,
        description=f"{len(targets)} asset partitions of experiment {exp.name}",
        run_config=run_config,
    )
    instance.add_backfill(backfill)
    return backfill.backfill_id
