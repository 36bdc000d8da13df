"""Partitions derived from the experiment file: `model`, `run`, and `model × run`.

Keys are the file's own ids (e.g. `tiny-llama`, `dpo-arith-r8-s0`), so they are
stable and readable; an adapter's key is Dagster's multi-partition key
`<model>|<run>` (dimensions in name order).
"""

from __future__ import annotations

from dataclasses import dataclass

from dagster import MultiPartitionKey, MultiPartitionsDefinition, StaticPartitionsDefinition

from lab_assets.config import Experiment


@dataclass(frozen=True)
class LabPartitions:
    models: StaticPartitionsDefinition
    runs: StaticPartitionsDefinition
    adapters: MultiPartitionsDefinition


def build_partitions(exp: Experiment) -> LabPartitions:
    models = StaticPartitionsDefinition(exp.model_ids)
    runs = StaticPartitionsDefinition(exp.run_ids)
    return LabPartitions(models, runs, MultiPartitionsDefinition({"model": models, "run": runs}))


def adapter_key(model_id: str, run_id: str) -> MultiPartitionKey:
    return MultiPartitionKey({"model": model_id, "run": run_id})


def split_adapter_key(key: str) -> tuple[str, str]:
    """`(model, run)` of an adapter partition key."""
    if isinstance(key, MultiPartitionKey):
        d = key.keys_by_dimension
        return d["model"], d["run"]
    model_id, sep, run_id = str(key).partition("|")
    if not sep:
        raise ValueError(f"{key!r} is not a model|run partition key")
    return model_id, run_id
