"""The sweep: which partitions are missing or stale, why, and the runs that fix them.

A partition is *missing* when storage holds no complete copy (no manifest) or the
Dagster instance has no materialisation of it; *stale* when the fingerprint
recorded with its latest materialisation (its data version) differs from the one
the experiment file and code expect now (`lab_assets.experiment.versions`); otherwise
*fresh*. A partition storage holds is *corrupt* when its files disagree with its
manifest: by default (`CHEAP`: file list and sizes, stray files; stat calls only, so
the automation condition and the staleness sensor can afford it every tick), or with
`verify=FULL` (`lab sweep --verify`) also each file's sha256, which reads every byte and
so only runs when asked. The sweep rematerialises exactly the missing, stale and corrupt
partitions, in dependency order, each run tagged with why it was launched.

`reconcile` is for a new or lost Dagster instance: it records, as runless
materialisations carrying their data version, the complete partitions storage
already holds, so nothing storage holds is recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dagster import AssetKey, AssetMaterialization, AssetRecordsFilter, DagsterInstance
from dagster._core.definitions.data_version import CODE_VERSION_TAG, DATA_VERSION_TAG

from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.versions import (
    ASSET_ORDER,
    Recipe,
    all_partitions,
    expected_recipes,
    ref,
)
from lab_assets.names import ADAPTERS_JOB, BASE_MODELS_JOB, CLASSIFICATION_JOB
from lab_assets.orchestration.runner import PlannedRun
from resources.io_manager import storage_metadata
from resources.storage.base import CHEAP, FULL, ArtifactStore

MISSING, STALE, CORRUPT, FRESH = "missing", "stale", "corrupt", "fresh"
VERIFY_LEVELS = (CHEAP, FULL)


@dataclass(frozen=True)
class PartitionStatus:
    asset: str
    partition: str | None
    state: str
    reasons: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return ref(self.asset, self.partition)


@dataclass(frozen=True)
class Recorded:
    fingerprint: str
    recipe: Recipe | None


def recorded(
    instance: DagsterInstance, asset: str, prefix: tuple[str, ...] = ()
) -> dict[str | None, Recorded]:
    """The latest materialisation's fingerprint (and recipe) per partition of `asset` (whose
    key is `prefix/asset`: see `Experiment.asset_prefix`)."""
    out: dict[str | None, Recorded] = {}
    cursor = None
    while True:
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey([*prefix, asset])), limit=1000, cursor=cursor
        )
        for rec in result.records:  # newest first
            if rec.partition_key in out:
                continue
            mat = rec.asset_materialization
            fp = _meta(mat.metadata.get("lab/fingerprint")) or (mat.tags or {}).get(
                DATA_VERSION_TAG
            )
            recipe = _meta(mat.metadata.get("lab/recipe"))
            out[rec.partition_key] = Recorded(
                str(fp), Recipe.from_dict(recipe) if isinstance(recipe, dict) else None
            )
        if not result.has_more:
            return out
        cursor = result.cursor


def _meta(v):
    return getattr(v, "value", v)


def assess(
    exp: Experiment, instance: DagsterInstance, store: ArtifactStore, *, verify: str = CHEAP
) -> list[PartitionStatus]:
    """The state of every partition of the experiment, upstream first.

    `verify` is how stored files are checked against their manifests: `CHEAP` (the
    default, what every automation tick runs) or `FULL` (sha256 of every file).
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, not {verify!r}")
    expected = expected_recipes(exp)
    statuses = []
    for asset in ASSET_ORDER:
        seen = recorded(instance, asset, exp.asset_prefix)
        for p in all_partitions(exp, asset):
            want = expected[(asset, p)]
            have = seen.get(p)
            manifest = store.read_manifest(asset, p)
            problems = [] if manifest is None else store.check(asset, p, manifest, level=verify)
            if manifest is None:
                statuses.append(PartitionStatus(asset, p, MISSING, ("not in storage",)))
            elif problems:
                why = tuple(pr.short for pr in problems)
                statuses.append(PartitionStatus(asset, p, CORRUPT, why))
            elif have is None:
                statuses.append(PartitionStatus(asset, p, MISSING, ("never materialised here",)))
            elif have.fingerprint != want.fingerprint:
                why = want.differences(have.recipe) if have.recipe else ["fingerprint changed"]
                statuses.append(PartitionStatus(asset, p, STALE, tuple(why)))
            elif manifest.metadata.get("fingerprint") != have.fingerprint:
                statuses.append(
                    PartitionStatus(asset, p, STALE, ("storage holds another version",))
                )
            else:
                statuses.append(PartitionStatus(asset, p, FRESH))
    return statuses


def plan_sweep(exp: Experiment, statuses: Iterable[PartitionStatus]) -> list[PlannedRun]:
    """Runs that rematerialise every non-fresh partition, in dependency order.

    A run's reason reads e.g. `adapter corrupt: adapter_model.safetensors sha256 mismatch`.
    """
    todo = {(s.asset, s.partition): s for s in statuses if s.state != FRESH}
    plan: list[PlannedRun] = []
    for job, assets, partitions in (
        (BASE_MODELS_JOB, ("base_model", "base_spectrum"), all_partitions(exp, "base_model")),
        (ADAPTERS_JOB, ("adapter", "spectral_features"), all_partitions(exp, "adapter")),
        (CLASSIFICATION_JOB, ("classification_results",), [None]),
    ):
        for p in partitions:
            hits = [todo[(a, p)] for a in assets if (a, p) in todo]
            if not hits:
                continue
            reason = "; ".join(f"{s.asset} {s.state}: {', '.join(s.reasons)}" for s in hits)
            label = f"{'+'.join(s.asset for s in hits)}" + (f" [{p}]" if p else "")
            plan.append(
                PlannedRun(job, p, label, assets=tuple(s.asset for s in hits), reason=reason)
            )
    return plan


def reconcile_events(
    exp: Experiment, instance: DagsterInstance, store: ArtifactStore
) -> list[AssetMaterialization]:
    """Materialisations for storage's complete partitions that this instance does not know."""
    events = []
    for asset in ASSET_ORDER:
        seen = recorded(instance, asset, exp.asset_prefix)
        for p in all_partitions(exp, asset):
            manifest = store.read_manifest(asset, p)
            if manifest is None or "fingerprint" not in manifest.metadata:
                continue
            fp = str(manifest.metadata["fingerprint"])
            if p in seen and seen[p].fingerprint == fp:
                continue
            recipe = manifest.metadata.get("recipe") or {}
            events.append(
                AssetMaterialization(
                    asset_key=exp.key_path(asset),
                    partition=p,
                    description="reconciled from storage",
                    metadata={
                        "lab/fingerprint": fp,
                        "lab/recipe": recipe,
                        **storage_metadata(store.uri(asset, p)),
                        "files": len(manifest.files),
                        "bytes": manifest.total_bytes,
                        "reconciled": True,
                    },
                    tags={DATA_VERSION_TAG: fp, CODE_VERSION_TAG: str(recipe.get("code", ""))},
                )
            )
    return events


def reconcile(exp: Experiment, instance: DagsterInstance, store: ArtifactStore) -> list[str]:
    """Record storage's complete partitions that this instance does not know; returns them."""
    events = reconcile_events(exp, instance, store)
    for e in events:
        instance.report_runless_asset_event(e)
    return [ref(e.asset_key.path[-1], e.partition) for e in events]


def key_style_error(exp: Experiment, instance: DagsterInstance) -> str | None:
    """Why `exp` must not run against `instance` with these asset keys, or None: the instance
    records the experiment under prefixed keys (a shared, several-experiment instance) while
    ``LAB_PREFIX_ASSET_KEYS`` is unset here, so every partition would look missing."""
    if exp.asset_prefix:
        return None
    from lab_assets.experiment.load import PREFIX_ENV, key_prefix

    prefixed = AssetKey([key_prefix(exp.name), ASSET_ORDER[0]])
    if not instance.has_asset_key(prefixed):
        return None
    return (
        f"this Dagster instance records experiment {exp.name} under prefixed asset keys "
        f"({prefixed.to_user_string()}, …: several experiments share it), but "
        f"${PREFIX_ENV} is not set here, so every partition would look missing: "
        f"export {PREFIX_ENV}=1"
    )


def sweep_targets(statuses: Iterable[PartitionStatus]) -> list[tuple[str, str | None]]:
    """The (asset, partition) pairs a sweep rebuilds: every one that is not fresh."""
    return [(s.asset, s.partition) for s in statuses if s.state != FRESH]


def in_flight(
    instance: DagsterInstance, prefix: tuple[str, ...] = ()
) -> dict[tuple[str, str | None], str]:
    """(asset, partition) → what is already rebuilding it: a backfill still requested
    (its targets not yet materialised or failed) or a queued or running run. A sweep
    leaves these out, so two sweeps (or a sweep beside a UI backfill) build each once.
    Only keys under `prefix` count (another experiment's `adapter` is not this one's)."""

    def name(key: AssetKey) -> str | None:
        return key.path[-1] if tuple(key.path[:-1]) == tuple(prefix) else None

    from dagster import DagsterRunStatus, RunsFilter
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    busy: dict[tuple[str, str | None], str] = {}
    active = BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED])
    for b in instance.get_backfills(filters=active):
        data = b.asset_backfill_data
        if data is None:
            continue
        settled = data.materialized_subset | data.failed_and_downstream_subset
        for ap in data.target_subset.iterate_asset_partitions():
            if ap not in settled and name(ap.asset_key):
                busy[(name(ap.asset_key), ap.partition_key)] = f"backfill {b.backfill_id}"
    running = RunsFilter(
        statuses=[
            DagsterRunStatus.QUEUED,
            DagsterRunStatus.NOT_STARTED,
            DagsterRunStatus.STARTING,
            DagsterRunStatus.STARTED,
        ]
    )
    for run in instance.get_runs(running):
        partition = run.tags.get("dagster/partition")
        for key in run.asset_selection or ():
            if name(key):
                busy.setdefault((name(key), partition), f"run {run.run_id[:8]}")
    return busy


class sweep_lock:  # noqa: N801 - used as a context manager, like open()
    """An exclusive lock from a sweep's planning until its backfill is written (`release`),
    so two sweeps started together do not plan the same partitions before either has
    submitted; the second then sees them in flight.

    A file lock on `$DAGSTER_HOME/lab/sweep.lock` (taken before the instance is opened:
    two processes creating one new SQLite instance at once would race), and, once the
    instance is open, on an instance whose runs live in PostgreSQL (a team's), a Postgres
    advisory lock as well (`across_machines`), which holds between laptops.
    """

    PG_KEY = 0x1AB5_EE9  # the advisory lock's key: any constant the lab owns

    def __init__(self, home: Path):
        (home / "lab").mkdir(parents=True, exist_ok=True)
        self._path = home / "lab" / "sweep.lock"
        self._file = None
        self._conn = None

    def __enter__(self) -> sweep_lock:
        import fcntl

        self._file = open(self._path, "a")  # noqa: SIM115 - closed by release()
        fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def across_machines(self, instance: DagsterInstance) -> bool:
        """Also take the instance's Postgres advisory lock, if its runs live in Postgres."""
        engine = _postgres_engine(instance)
        if engine is None:
            return False
        from sqlalchemy import text

        self._conn = engine.connect()
        self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.PG_KEY})
        return True

    def release(self) -> None:
        if self._conn is not None:
            self._conn.close()  # the session ends: its advisory lock is released
            self._conn = None
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __exit__(self, *exc: object) -> None:
        self.release()


def _postgres_engine(instance: DagsterInstance | None):
    """The SQLAlchemy engine of the instance's run storage if it is PostgreSQL, else None."""
    if instance is None:
        return None
    storage = instance.run_storage
    storage = getattr(storage, "_storage", storage)  # DagsterStorage wraps the parts
    storage = getattr(storage, "run_storage", storage)
    engine = getattr(storage, "_engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        return None
    return engine
