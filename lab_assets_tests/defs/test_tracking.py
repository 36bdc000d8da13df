"""Every adapter run lands in MLflow, and an unreachable MLflow only warns.

A few adapters of the small experiment are materialised in-process (`run_planned`,
no daemon) on one base model built once for the module; what MLflow recorded is read
back through MLflow's own client from the local store under the storage root.
"""

import logging
import socket

import pytest
from dagster import AssetKey, DagsterInstance

from lab_assets.defs.tracking import tracking_metadata
from lab_assets.experiment.load import load_experiment
from lab_assets.names import ADAPTER, ADAPTERS_JOB, BASE_MODEL, BASE_MODELS_JOB
from lab_assets.orchestration.runner import PlannedRun, run_planned
from lab_assets_tests.conftest import SMALL_EXPERIMENT
from resources.storage.local import LocalArtifactStore
from resources.tracking import TRACKING_URI_ENV, TrackedRun, local_db

# MLflow's SQLAlchemy store, read back here, uses a loader SQLAlchemy 2.1 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

MODEL = "tiny-test"
TRACKED = (f"{MODEL}|sft-arith-r4-s0", f"{MODEL}|dpo-arith-r4-s0")
UNREACHABLE = f"{MODEL}|sft-reverse-r4-s0"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A fresh storage root and Dagster instance holding the small experiment's base model;
    no tracking URI in the environment (runs go to the local store)."""
    root = tmp_path_factory.mktemp("tracking")
    for d in ("storage", "scratch", "home"):
        (root / d).mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_STORAGE_ROOT", str(root / "storage"))
        mp.setenv("LAB_SCRATCH_ROOT", str(root / "scratch"))
        mp.setenv("DAGSTER_HOME", str(root / "home"))
        mp.delenv(TRACKING_URI_ENV, raising=False)
        exp = load_experiment(SMALL_EXPERIMENT)
        with DagsterInstance.local_temp(str(root / "home")) as instance:
            run_planned(instance, exp, PlannedRun(BASE_MODELS_JOB, MODEL, "base", (BASE_MODEL,)))
            yield {"exp": exp, "instance": instance, "mp": mp}


def materialise(lab, key: str):
    planned = PlannedRun(ADAPTERS_JOB, key, key, (ADAPTER,))
    return run_planned(lab["instance"], lab["exp"], planned)


def adapter_metadata(instance, key: str) -> dict:
    records = instance.fetch_materializations(AssetKey(ADAPTER), limit=100).records
    mats = [r.asset_materialization for r in records if r.asset_materialization.partition == key]
    assert mats, key
    return mats[0].metadata  # newest first


def test_each_adapter_is_one_mlflow_run_with_params_curve_metrics_and_tags(lab):
    from mlflow.tracking import MlflowClient

    exp, instance = lab["exp"], lab["instance"]
    outcomes = {key: materialise(lab, key) for key in TRACKED}
    db = local_db(exp.storage_root, exp.name)
    assert db is not None and db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(exp.name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_partition = {r.data.tags["dagster/partition"]: r for r in runs}
    assert sorted(by_partition) == sorted(TRACKED) and len(runs) == len(TRACKED)
    store = LocalArtifactStore(exp.storage_root, exp.name)
    for key, outcome in outcomes.items():
        run = by_partition[key]
        spec = exp.run(key.split("|", 1)[1])
        assert run.info.status == "FINISHED"
        assert run.info.run_name == key
        params = run.data.params
        assert params["method"] == spec.method and params["task"] == spec.task
        assert params["seed"] == str(spec.seed) and params["arm"] == spec.arm
        assert params["base_model"] == MODEL
        for k in ("rank", "alpha", "steps", "learning_rate", "batch_size", "n_examples"):
            assert params[k] == str(getattr(spec.hyper, k)), k
        assert params["target_modules"] == ",".join(spec.hyper.target_modules)
        loss = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in loss] == list(range(1, spec.hyper.steps + 1))
        metrics = run.data.metrics
        assert metrics["final_loss"] == pytest.approx(loss[-1].value)
        for k in ("task_metric", "base_task_metric", "nll", "reward_accuracy", "beats_base"):
            assert f"heldout/{k}" in metrics, k
        tags = run.data.tags
        assert tags["dagster/run_id"] == outcome.run_id
        assert tags["lab/artifact_uri"] == store.uri(ADAPTER, key)
        meta = adapter_metadata(instance, key)
        assert meta["mlflow/run_id"].value == run.info.run_id
        assert meta["mlflow/experiment_id"].value == experiment.experiment_id
        assert meta["mlflow/run"].value == str(db)  # a local store: its path (a URL for http)
        assert meta["heldout/task_metric"].value == pytest.approx(
            metrics["heldout/task_metric"], rel=1e-3
        )  # metadata is rounded


def test_unreachable_mlflow_only_warns(lab):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lab["mp"].setenv(TRACKING_URI_ENV, f"http://127.0.0.1:{port}")
    try:
        outcome = materialise(lab, UNREACHABLE)
    finally:
        lab["mp"].delenv(TRACKING_URI_ENV)
    instance = lab["instance"]
    warnings = [
        e.user_message
        for e in instance.all_logs(outcome.run_id)
        if e.level == logging.WARNING and "MLflow" in e.user_message
    ]
    assert len(warnings) == 1, warnings
    assert f"127.0.0.1:{port}" in warnings[0]
    meta = adapter_metadata(instance, UNREACHABLE)
    assert "heldout/task_metric" in meta and not any(k.startswith("mlflow/") for k in meta)


def test_an_http_tracking_server_gives_a_url_on_the_materialisation():
    link = "https://mlflow.example/#/experiments/3/runs/abc"
    meta = tracking_metadata(TrackedRun("abc", "3", "https://mlflow.example", link, None))
    assert (
        meta["mlflow/run"].value == link and type(meta["mlflow/run"]).__name__ == "UrlMetadataValue"
    )
    assert meta["mlflow/run_id"].value == "abc"
    assert tracking_metadata(None) == {}
