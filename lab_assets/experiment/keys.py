"""Partition keys as strings: an adapter is `<model>|<run>` (Dagster's multi-partition key).

Dagster's `MultiPartitionKey` joins dimension values in dimension-name order with
`|`; `model` sorts before `run`, so the string form is `model|run`. Plain strings
keep the experiment layer free of Dagster.
"""

from __future__ import annotations


def adapter_key(model_id: str, run_id: str) -> str:
    return f"{model_id}|{run_id}"


def split_adapter_key(key: str) -> tuple[str, str]:
    """`(model, run)` of an adapter partition key (a `MultiPartitionKey` is a str too)."""
    model_id, sep, run_id = str(key).partition("|")
    if not sep or not model_id or not run_id:
        raise ValueError(f"{key!r} is not a model|run partition key")
    return model_id, run_id
