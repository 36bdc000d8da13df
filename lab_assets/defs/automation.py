"""Declarative automation: rebuild exactly the partitions the lab finds missing or stale.

`LabOutdated` is a custom `AutomationCondition`: true for the partitions that
`orchestration.sweep.assess` finds missing or stale, i.e. whose recorded recipe
fingerprint differs from what the experiment file and code expect now (or that
storage or this instance lacks). Each asset's condition is

    lab_outdated & ~any input outdated & ~(in progress, or any ancestor)  [& cron tick]

so a partition already being rebuilt (a run or a backfill) is never requested again,
and nothing is built over an input that is outdated or being rebuilt, however far up:
each tick requests the most upstream outdated partitions, their dependents follow on
later ticks, each rebuilt exactly once (one tick's launched runs are not ordered
among themselves, so they must not depend on one another). The automation sensor
(``schedules.py``) evaluates it in the code server.

One `assess` serves all five assets of a tick: the result is cached by the
evaluation's time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime

from dagster import AutomationCondition, AutomationResult, DagsterInstance
from dagster._core.definitions.declarative_automation.automation_context import (
    AutomationContext,
)

from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.versions import CODE_VERSIONS
from lab_assets.orchestration.sweep import FRESH, PartitionStatus, assess
from resources.io_manager import LabStorage

OUTDATED_LABEL = "missing or stale by the lab's recipe"
REBUILD_LABEL = "rebuild when missing or stale"


class Assessment:
    """`assess` of the whole experiment, computed once per evaluation time."""

    def __init__(self, exp: Experiment, storage: LabStorage):
        self.exp = exp
        self.storage = storage
        self._lock = threading.Lock()
        self._last: tuple[tuple[int, datetime], list[PartitionStatus]] | None = None

    def statuses(self, instance: DagsterInstance, when: datetime) -> list[PartitionStatus]:
        key = (id(instance), when)
        with self._lock:
            if self._last is None or self._last[0] != key:
                self._last = (key, assess(self.exp, instance, self.storage.store))
            return self._last[1]

    def outdated(self, instance: DagsterInstance, when: datetime, asset: str) -> list[str | None]:
        """The partitions of `asset` that are not fresh (None: the unpartitioned one)."""
        return [
            s.partition
            for s in self.statuses(instance, when)
            if s.asset == asset and s.state != FRESH
        ]


class LabOutdated(AutomationCondition):
    """True for the partitions the lab's recipes find missing or stale."""

    def __init__(self, assessment: Assessment):
        self._assessment = assessment

    @property
    def name(self) -> str:
        return "lab_outdated"

    @property
    def description(self) -> str:
        return (
            "Missing, or stale: the recipe recorded with the partition (code version, "
            "config values, input fingerprints) differs from what the experiment file "
            "and code expect now (see the partition's `lab/why` observation)"
        )

    @property
    def children(self) -> Sequence[AutomationCondition]:
        return []

    def evaluate(self, context: AutomationContext) -> AutomationResult:
        candidates = context.candidate_subset
        if candidates.is_empty:
            return AutomationResult(context, candidates)
        view = context.asset_graph_view
        keys = self._assessment.outdated(
            view.instance, context.evaluation_time, context.key.path[-1]
        )
        if not candidates.is_partitioned:
            true = candidates if keys else context.get_empty_subset()
        else:
            true = candidates.compute_intersection_with_partition_keys(
                {k for k in keys if k is not None}
            )
        return AutomationResult(context, true)


def self_or_ancestors_in_progress(depth: int) -> AutomationCondition:
    """In progress, or some ancestor up to `depth` levels up is (the graph is that deep)."""
    busy = AutomationCondition.in_progress()
    for _ in range(depth):
        busy = AutomationCondition.in_progress() | AutomationCondition.any_deps_match(busy)
    return busy.with_label("in progress, or an ancestor is")


def rebuild_condition(
    assessment: Assessment, cron: str | None = None, timezone: str = "UTC"
) -> AutomationCondition:
    """The condition every lab asset carries: outdated, not in progress, inputs settled."""
    outdated = LabOutdated(assessment)
    # Inputs first: a partition waits while an input is itself outdated, so each tick
    # requests only the most upstream outdated partitions (launched runs of one tick
    # are not ordered), and each partition is rebuilt once, over fresh inputs.
    cond = (
        outdated
        & ~AutomationCondition.any_deps_match(outdated)
        & ~self_or_ancestors_in_progress(len(CODE_VERSIONS) - 1)
    )
    if cron:
        cond = cond & AutomationCondition.cron_tick_passed(cron, timezone).since_last_handled()
    return cond.with_label(REBUILD_LABEL)


def experiment_condition(exp: Experiment, storage: LabStorage) -> AutomationCondition:
    """The rebuild condition of `exp`'s assets, on its `sweep.cron` if it has one."""
    spec = exp.file.sweep
    return rebuild_condition(Assessment(exp, storage), spec.cron, spec.timezone)
