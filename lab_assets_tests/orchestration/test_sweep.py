"""Only stale or missing partitions rematerialise: fingerprints, sweeps, reconcile, schedule.

Each test works on its own copy of the session's materialised small experiment
and counts what happened from the Dagster instance's event log.
"""

import shutil
import subprocess
import sys

import pytest
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    RunsFilter,
    build_schedule_context,
    build_sensor_context,
)

from lab_assets.experiment.load import load_experiment
from lab_assets.orchestration.runner import run_planned
from lab_assets.orchestration.sweep import FRESH, MISSING, STALE, assess, plan_sweep, reconcile
from lab_assets_tests.conftest import SMALL_EXPERIMENT, TESTS_DIR, patched_env
from resources.storage.local import LocalArtifactStore

EDITED = "tiny-test|dpo-arith-r4-s1"


@pytest.fixture
def lab_copy(small_lab, tmp_path):
    """A private copy of the materialised lab (storage + Dagster home) and its env."""
    root = tmp_path / "lab"
    shutil.copytree(small_lab["root"] / "storage", root / "storage")
    shutil.copytree(small_lab["root"] / "home", root / "home")
    (root / "scratch").mkdir()
    env = {
        "LAB_STORAGE_ROOT": str(root / "storage"),
        "LAB_SCRATCH_ROOT": str(root / "scratch"),
        "DAGSTER_HOME": str(root / "home"),
        "LAB_EXPERIMENT": str(SMALL_EXPERIMENT),
    }
    with patched_env(env), DagsterInstance.get() as instance:
        yield {"root": root, "env": env, "instance": instance, "tmp": tmp_path}


def edited_experiment(tmp_path, old: str, new: str, name="edited.yaml"):
    text = SMALL_EXPERIMENT.read_text()
    assert old in text
    p = tmp_path / name
    p.write_text(text.replace(old, new))
    return load_experiment(p)


def store_for(exp, lab):
    return LocalArtifactStore(lab["env"]["LAB_STORAGE_ROOT"], exp.name)


def not_fresh(statuses):
    return {(s.asset, s.partition): s for s in statuses if s.state != FRESH}


def counts(instance):
    mats = {
        a: len(instance.fetch_materializations(AssetKey(a), limit=1000).records)
        for a in ("base_model", "adapter", "spectral_features", "classification_results")
    }
    return len(instance.get_runs()), mats


def sweep(exp, instance, store):
    plan = plan_sweep(exp, assess(exp, instance, store))
    for p in plan:
        run_planned(instance, exp, p)
    return plan


def test_unchanged_experiment_sweeps_nothing(lab_copy):
    exp, instance = load_experiment(SMALL_EXPERIMENT), lab_copy["instance"]
    statuses = assess(exp, instance, store_for(exp, lab_copy))
    assert len(statuses) == 2 + 2 * 8 + 1 and not not_fresh(statuses)
    before = counts(instance)
    proc = subprocess.run(
        [sys.executable, "-m", "lab_assets.cli", "sweep"],
        capture_output=True,
        text=True,
        cwd=TESTS_DIR.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing missing or stale; no runs launched" in proc.stdout
    assert counts(instance) == before


def test_editing_one_learning_rate_rematerialises_exactly_its_lineage(lab_copy):
    instance = lab_copy["instance"]
    exp = edited_experiment(
        lab_copy["tmp"],
        "{method: dpo, task: arith, seed: 1}",
        "{method: dpo, task: arith, seed: 1, learning_rate: 0.005}",
    )
    store = store_for(exp, lab_copy)
    stale = not_fresh(assess(exp, instance, store))
    assert set(stale) == {
        ("adapter", EDITED),
        ("spectral_features", EDITED),
        ("classification_results", None),
    }
    assert all(s.state == STALE for s in stale.values())
    assert stale[("adapter", EDITED)].reasons == ("config changed",)
    assert stale[("spectral_features", EDITED)].reasons == (f"input adapter[{EDITED}] changed",)
    assert stale[("classification_results", None)].reasons == (
        f"input spectral_features[{EDITED}] changed",
    )

    runs_before, mats_before = counts(instance)
    plan = sweep(exp, instance, store)
    assert [(p.job, p.partition) for p in plan] == [
        ("adapters_job", EDITED),
        ("classification_job", None),
    ]
    runs_after, mats_after = counts(instance)
    assert runs_after - runs_before == 2
    assert {a: mats_after[a] - mats_before[a] for a in mats_after} == {
        "base_model": 0,
        "adapter": 1,
        "spectral_features": 1,
        "classification_results": 1,
    }
    latest = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("adapter"), asset_partitions=[EDITED]), limit=1
    ).records[0]
    run = instance.get_run_by_id(latest.run_id)
    assert "adapter stale: config changed" in run.tags["lab/reason"]
    # and a second sweep launches nothing
    assert sweep(exp, instance, store) == []
    assert counts(instance)[0] == runs_after


def test_spectral_code_version_stales_features_not_adapters(lab_copy, monkeypatch):
    import lab_assets.experiment.versions as versions

    exp, instance = load_experiment(SMALL_EXPERIMENT), lab_copy["instance"]
    monkeypatch.setitem(versions.CODE_VERSIONS, "spectral_features", "2")
    stale = not_fresh(assess(exp, instance, store_for(exp, lab_copy)))
    assert {a for a, _ in stale} == {"spectral_features", "classification_results"}
    assert len([1 for a, _ in stale if a == "spectral_features"]) == 8
    assert stale[("spectral_features", EDITED)].reasons == ("code version 1 -> 2",)


def test_added_runs_are_missing_and_nothing_else_rebuilds(lab_copy):
    exp = edited_experiment(
        lab_copy["tmp"],
        "  - {method: dpo, task: reverse, seed: 1}",
        "  - {method: dpo, task: reverse, seed: 1}\n  - {method: lora_sft, task: arith, seed: 7}",
    )
    stale = not_fresh(assess(exp, lab_copy["instance"], store_for(exp, lab_copy)))
    new = "tiny-test|sft-arith-r4-s7"
    assert set(stale) == {
        ("adapter", new),
        ("spectral_features", new),
        ("classification_results", None),
    }
    assert stale[("adapter", new)].state == MISSING
    assert stale[("classification_results", None)].reasons == (
        f"input spectral_features[{new}] changed",
    )


def test_new_instance_reconciles_from_storage_and_recomputes_nothing(lab_copy, tmp_path):
    exp = load_experiment(SMALL_EXPERIMENT)
    store = store_for(exp, lab_copy)
    (tmp_path / "new_home").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "new_home")) as fresh:
        statuses = assess(exp, fresh, store)
        assert {s.state for s in statuses} == {MISSING}  # this instance has never seen them
        recorded = reconcile(exp, fresh, store)
        assert len(recorded) == len(statuses)
        assert not not_fresh(assess(exp, fresh, store))
        assert plan_sweep(exp, assess(exp, fresh, store)) == []
        assert fresh.get_runs() == []  # nothing was recomputed
        assert reconcile(exp, fresh, store) == []  # idempotent


def test_a_partition_lost_from_storage_is_missing(lab_copy):
    exp, instance = load_experiment(SMALL_EXPERIMENT), lab_copy["instance"]
    store = store_for(exp, lab_copy)
    (store.local_path("adapter", EDITED) / "manifest.json").unlink()
    stale = not_fresh(assess(exp, instance, store))
    assert stale[("adapter", EDITED)].state == MISSING
    assert stale[("adapter", EDITED)].reasons == ("not in storage",)


def test_schedule_and_reconcile_sensor_evaluate(lab_copy, tmp_path):
    from lab_assets.definitions import build_definitions

    exp = edited_experiment(
        tmp_path,
        "classification: {n_permutations: 10}",
        "classification: {n_permutations: 10}\nsweep: {cron: '0 3 * * *', max_gpu_in_flight: 2}",
    )
    defs = build_definitions(exp)
    schedule = defs.get_schedule_def("sweep_schedule")
    assert schedule.cron_schedule == "0 3 * * *"
    instance = lab_copy["instance"]
    ctx = build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
    result = schedule.evaluate_tick(ctx)
    assert not result.run_requests and "nothing missing or stale" in result.skip_message

    edited = edited_experiment(
        tmp_path,
        "{method: dpo, task: arith, seed: 1}",
        "{method: dpo, task: arith, seed: 1, steps: 5}",
        name="edited2.yaml",
    )
    edited_text = edited.path.read_text() + "sweep: {cron: '0 3 * * *'}\n"
    edited.path.write_text(edited_text)
    defs = build_definitions(load_experiment(edited.path))
    schedule = defs.get_schedule_def("sweep_schedule")
    ctx = build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
    (request,) = schedule.evaluate_tick(ctx).run_requests
    assert request.job_name in (None, "sweep_job") and schedule.job_name == "sweep_job"
    assert request.tags["lab/sweep_runs"] == "2"
    assert request.tags["lab/sweep_plan"] == (
        f"adapter+spectral_features [{EDITED}]; classification_results"
    )

    sensor = defs.get_sensor_def("reconcile_from_storage")
    (tmp_path / "other_home").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "other_home")) as other:
        data = sensor.evaluate_tick(build_sensor_context(instance=other, definitions=defs))
        assert len(data.asset_events) == 2 + 2 * 8 + 1
        assert isinstance(
            sensor.evaluate_tick(
                build_sensor_context(instance=instance, definitions=defs)
            ).skip_message,
            str,
        )
    assert not instance.get_runs(RunsFilter(job_name="sweep_job"))  # evaluation launches nothing


def test_gpu_pool_limit_comes_from_the_experiment(tmp_path):
    from lab_assets.orchestration.instance import set_gpu_pool_limit

    exp = edited_experiment(
        tmp_path,
        "classification: {n_permutations: 10}",
        "classification: {n_permutations: 10}\nsweep: {max_gpu_in_flight: 3}",
    )
    (tmp_path / "home").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "home")) as instance:
        set_gpu_pool_limit(instance, exp)
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 3
    from lab_assets.defs.assets import build_assets
    from lab_assets.defs.partitions import build_partitions

    adapter = next(a for a in build_assets(exp, build_partitions(exp)) if a.key.path == ["adapter"])
    assert adapter.op.pool == "gpu"
