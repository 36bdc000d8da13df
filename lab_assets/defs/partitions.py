"""Partitions derived from the experiment file: `model`, `run`, and `model × run`.

Keys are the file's own ids (e.g. `tiny-llama`, `dpo-arith-r8-s0`), so they are
stable and readable; an adapter's key is Dagster's multi-partition key
`<model>|<run>` (dimensions in name order; see `lab_assets.experiment.keys`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dagster import MultiPartitionsDefinition, StaticPartitionsDefinition

from lab_assets.experiment.resolved import Experiment


@dataclass(frozen=True)
class LabPartitions:
    models: StaticPartitionsDefinition
    runs: StaticPartitionsDefinition
    adapters: MultiPartitionsDefinition


def build_partitions(exp: Experiment) -> LabPartitions:
    models = StaticPartitionsDefinition(exp.model_ids)
    runs = StaticPartitionsDefinition(exp.run_ids)
    return LabPartitions(models, runs, MultiPartitionsDefinition({"model": models, "run": runs}))
