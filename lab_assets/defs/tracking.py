"""Every adapter training run in MLflow, and the MLflow run's link on its materialisation.

Why it exists: the adapter asset knows the run (its spec, loss curve, held-out
evaluation, where it is stored); this module turns that into plain data for
`resources.tracking` (the MLflow client work, which never raises) and turns the MLflow
run back into Dagster metadata (``mlflow/…``). One MLflow run per materialisation, in
the MLflow experiment named after the lab experiment, tagged with the Dagster run id
and partition key. A tracking failure is a warning line in the run's log, never a
failed step.
"""

from __future__ import annotations

from typing import Any

from dagster import AssetExecutionContext, MetadataValue

from lab_assets.experiment.keys import split_adapter_key
from lab_assets.experiment.resolved import Experiment, RunSpec
from resources.tracking import RunRecord, TrackedRun, log_run

# Tags on the MLflow run (Dagster's own spelling where Dagster has one).
DAGSTER_RUN_TAG = "dagster/run_id"
PARTITION_TAG = "dagster/partition"
ASSET_TAG = "dagster/asset"
ARTIFACT_URI_TAG = "lab/artifact_uri"
LOSS_METRIC = "loss"
HELDOUT_PREFIX = "heldout/"


def adapter_record(
    exp: Experiment,
    run: RunSpec,
    partition_key: str,
    dagster_run_id: str,
    loss_curve: list[float],
    train: dict[str, float],
    heldout: dict[str, Any],
    artifact_uri: str,
) -> RunRecord:
    """The MLflow run of one adapter: hyper-parameters, loss curve, held-out metrics, URI."""
    model_id, run_id = split_adapter_key(partition_key)
    params: dict[str, Any] = {
        "method": run.method,
        "task": run.task,
        "seed": run.seed,
        "arm": run.arm,
        "base_model": model_id,
        "run_id": run_id,
        **run.hyper.model_dump(mode="json"),
    }
    metrics = {k: float(v) for k, v in train.items()}
    for k, v in heldout.items():
        if isinstance(v, bool | int | float):
            metrics[HELDOUT_PREFIX + k] = float(v)
    tags = {
        DAGSTER_RUN_TAG: dagster_run_id,
        PARTITION_TAG: partition_key,
        ASSET_TAG: "adapter",
        ARTIFACT_URI_TAG: artifact_uri,
        "lab/experiment": exp.name,
        "lab/model_fingerprint": exp.model_fingerprint(model_id),
        "lab/run_fingerprint": run.fingerprint(),
    }
    if "metric_name" in heldout:
        tags[HELDOUT_PREFIX + "metric_name"] = str(heldout["metric_name"])
    return RunRecord(
        experiment=exp.name,
        run_name=partition_key,
        params=params,
        tags=tags,
        metrics=metrics,
        series={LOSS_METRIC: loss_curve},
    )


def tracking_metadata(tracked: TrackedRun | None) -> dict[str, MetadataValue]:
    """``mlflow/…`` metadata: the run's link (a URL for an http(s) server, else where the
    store is and the run id); nothing when the run was not logged."""
    if tracked is None:
        return {}
    meta = {
        "mlflow/run_id": MetadataValue.text(tracked.run_id),
        "mlflow/experiment_id": MetadataValue.text(tracked.experiment_id),
        "mlflow/tracking_uri": MetadataValue.text(tracked.tracking_uri),
    }
    if tracked.link:
        meta["mlflow/run"] = MetadataValue.url(tracked.link)
    elif tracked.local_db:
        meta["mlflow/run"] = MetadataValue.path(str(tracked.local_db))
    else:
        meta["mlflow/run"] = MetadataValue.text(f"{tracked.tracking_uri} run {tracked.run_id}")
    return meta


def track_adapter(
    context: AssetExecutionContext,
    exp: Experiment,
    run: RunSpec,
    result: Any,  # lab_assets.ml.train.TrainResult (imported lazily by the asset)
    heldout: dict[str, Any],
    artifact_uri: str,
) -> dict[str, MetadataValue]:
    """Log the adapter's run to MLflow; its ``mlflow/…`` metadata (empty if not logged)."""
    try:
        return _track_adapter(context, exp, run, result, heldout, artifact_uri)
    except Exception as e:  # tracking must never fail the adapter
        context.log.warning(f"MLflow: adapter run not logged: {type(e).__name__}: {e}")
        return {}


def _track_adapter(
    context: AssetExecutionContext,
    exp: Experiment,
    run: RunSpec,
    result: Any,
    heldout: dict[str, Any],
    artifact_uri: str,
) -> dict[str, MetadataValue]:
    train = {
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "wall_s": result.wall_s,
        "trainable_params": result.trainable_params,
    }
    record = adapter_record(
        exp,
        run,
        context.partition_key,
        context.run_id,
        [float(x) for x in result.loss_curve],
        train,
        heldout,
        artifact_uri,
    )
    tracked = log_run(record, exp.storage_root, info=context.log.info, warn=context.log.warning)
    return tracking_metadata(tracked)
