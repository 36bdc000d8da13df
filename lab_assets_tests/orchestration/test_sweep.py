"""Only stale or missing partitions rematerialise: fingerprints, sweeps, reconcile, automation.

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
    build_sensor_context,
    evaluate_automation_conditions,
)

from lab_assets.experiment.load import load_experiment
from lab_assets.experiment.versions import Recipe
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
    assert stale[("adapter", EDITED)].reasons == ("learning_rate 0.001 → 0.005",)
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
    assert "adapter stale: learning_rate 0.001 → 0.005" in run.tags["lab/reason"]
    # and a second sweep launches nothing
    assert sweep(exp, instance, store) == []
    assert counts(instance)[0] == runs_after


def test_spectral_code_version_stales_features_not_adapters(lab_copy, monkeypatch):
    import lab_assets.experiment.versions as versions

    exp, instance = load_experiment(SMALL_EXPERIMENT), lab_copy["instance"]
    old = versions.CODE_VERSIONS["spectral_features"]
    monkeypatch.setitem(versions.CODE_VERSIONS, "spectral_features", f"{old}-next")
    stale = not_fresh(assess(exp, instance, store_for(exp, lab_copy)))
    assert {a for a, _ in stale} == {"spectral_features", "classification_results"}
    assert len([1 for a, _ in stale if a == "spectral_features"]) == 8
    assert stale[("spectral_features", EDITED)].reasons == (f"code version {old} → {old}-next",)


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


def test_differences_name_fields_and_old_records_say_config_changed():
    new = Recipe("2", "c2", {"adapter[x]": "f2"}, {"learning_rate": 0.002, "steps": 4})
    old = Recipe("1", "c1", {"adapter[x]": "f1"}, {"learning_rate": 0.001, "steps": 4})
    assert new.differences(old) == [
        "code version 1 → 2",
        "learning_rate 0.001 → 0.002",
        "input adapter[x] changed",
    ]
    legacy = Recipe.from_dict({"code": "2", "config": "c1", "inputs": {"adapter[x]": "f2"}})
    assert new.differences(legacy) == ["config changed"]
    assert Recipe.from_dict(new.to_dict()) == new and new.to_dict()["values"]["steps"] == 4
    assert new.fingerprint == Recipe("2", "c2", {"adapter[x]": "f2"}).fingerprint  # not hashed
    listed = Recipe("1", "c", {}, {"target_modules": ["q_proj", "v_proj"]})
    unset = Recipe("1", "d", {}, {"tag": "x"})
    assert listed.differences(unset) == [
        "tag x → (unset)",
        "target_modules (unset) → [q_proj, v_proj]",
    ]


ASSETS = ("base_model", "base_spectrum", "adapter", "spectral_features", "classification_results")


def requested(result):
    return {(a, p) for a in ASSETS for p in result.get_requested_partitions(AssetKey(a))}


def test_automation_requests_exactly_the_stale_partitions(lab_copy, tmp_path):
    from lab_assets.definitions import build_definitions

    instance = lab_copy["instance"]
    defs = build_definitions(load_experiment(SMALL_EXPERIMENT))
    sensor = defs.get_sensor_def("rebuild_stale_and_missing")
    assert sensor.default_status.value == "STOPPED"  # switching it on is the UI's action
    assert not evaluate_automation_conditions(defs, instance).total_requested
    runs = len(instance.get_runs())

    edited = edited_experiment(
        tmp_path,
        "{method: dpo, task: arith, seed: 1}",
        "{method: dpo, task: arith, seed: 1, learning_rate: 0.002}",
    )
    result = evaluate_automation_conditions(build_definitions(edited), instance)
    assert requested(result) == {("adapter", EDITED)}  # inputs first; dependents follow
    assert len(instance.get_runs()) == runs  # evaluating launches nothing


def test_automation_never_requests_a_partition_in_progress(lab_copy, tmp_path):
    import time

    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
    from dagster._core.execution.backfill import PartitionBackfill

    from lab_assets.definitions import build_definitions
    from lab_assets.defs.partitions import build_partitions

    instance = lab_copy["instance"]
    edited = edited_experiment(
        tmp_path,
        "{method: dpo, task: arith, seed: 1}",
        "{method: dpo, task: arith, seed: 1, learning_rate: 0.002}",
    )
    defs = build_definitions(edited)
    adapters = build_partitions(edited).adapters
    subset = AssetGraphSubset(
        partitions_subsets_by_asset_key={
            AssetKey("adapter"): adapters.subset_with_partition_keys([EDITED])
        }
    )
    instance.add_backfill(
        PartitionBackfill.from_asset_graph_subset(
            backfill_id="inflight",
            backfill_timestamp=time.time(),
            tags={},
            dynamic_partitions_store=instance,
            asset_graph_subset=subset,
            title="in flight",
            description=None,
            run_config=None,
        )
    )
    result = evaluate_automation_conditions(defs, instance)
    assert requested(result) == set()  # the adapter is in progress; its downstream waits


def test_sweep_cron_gates_the_same_condition(lab_copy, tmp_path):
    import datetime

    from lab_assets.definitions import build_definitions

    exp = edited_experiment(
        tmp_path,
        "{method: dpo, task: arith, seed: 1}",
        "{method: dpo, task: arith, seed: 1, steps: 5}",
    )
    exp.path.write_text(exp.path.read_text() + "sweep: {cron: '0 3 * * *'}\n")
    defs = build_definitions(load_experiment(exp.path))
    sensor = defs.get_sensor_def("rebuild_stale_and_missing")
    assert sensor.default_status.value == "RUNNING"  # the scheduled sweep
    assert not defs.schedules and "sweep_job" not in {j.name for j in defs.jobs}
    instance = lab_copy["instance"]
    t0 = datetime.datetime(2030, 1, 1, 2, 0, tzinfo=datetime.UTC)
    first = evaluate_automation_conditions(defs, instance, evaluation_time=t0)
    assert first.total_requested == 0  # stale, but no cron tick yet
    later = t0 + datetime.timedelta(hours=1, minutes=5)
    result = evaluate_automation_conditions(
        defs, instance, evaluation_time=later, cursor=first.cursor
    )
    assert requested(result) == {("adapter", EDITED)}  # inputs first; dependents follow


def test_staleness_sensor_records_why_once(lab_copy, tmp_path):
    from lab_assets.definitions import build_definitions

    instance = lab_copy["instance"]
    sensor = build_definitions(load_experiment(SMALL_EXPERIMENT)).get_sensor_def("lab_staleness")
    defs = build_definitions(load_experiment(SMALL_EXPERIMENT))
    tick = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))
    assert not tick.asset_events and "no change: 0" in tick.skip_message

    edited = edited_experiment(
        tmp_path,
        "{method: dpo, task: arith, seed: 1}",
        "{method: dpo, task: arith, seed: 1, learning_rate: 0.002}",
    )
    defs = build_definitions(edited)
    sensor = defs.get_sensor_def("lab_staleness")
    tick = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))
    why = {
        (e.asset_key.to_user_string(), e.partition): e.metadata["lab/why"].value
        for e in tick.asset_events
    }
    assert why == {
        ("adapter", EDITED): "learning_rate 0.001 → 0.002",
        ("spectral_features", EDITED): f"input adapter[{EDITED}] changed",
        ("classification_results", None): f"input spectral_features[{EDITED}] changed",
    }
    assert {e.metadata["lab/state"].value for e in tick.asset_events} == {"stale"}
    ctx = build_sensor_context(instance=instance, definitions=defs, cursor=tick.cursor)
    again = sensor.evaluate_tick(ctx)
    assert not again.asset_events and "no change: 3" in again.skip_message
    # back to the original file: the three are fresh again, and say so once
    defs = build_definitions(load_experiment(SMALL_EXPERIMENT))
    ctx = build_sensor_context(instance=instance, definitions=defs, cursor=tick.cursor)
    back = defs.get_sensor_def("lab_staleness").evaluate_tick(ctx)
    assert {e.metadata["lab/state"].value for e in back.asset_events} == {"fresh"}
    assert len(back.asset_events) == 3


def test_reconcile_sensor_evaluates(lab_copy, tmp_path):
    from lab_assets.definitions import build_definitions

    defs = build_definitions(load_experiment(SMALL_EXPERIMENT))
    instance = lab_copy["instance"]
    runs = len(instance.get_runs())
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
    assert len(instance.get_runs()) == runs  # evaluation launches nothing


def test_gpu_pool_limit_comes_from_the_experiment(tmp_path):
    from lab_assets.orchestration.instance import set_pool_limits

    exp = edited_experiment(
        tmp_path,
        "classification: {n_permutations: 10}",
        "classification: {n_permutations: 10}\nsweep: {max_gpu_in_flight: 3}",
    )
    gce_file = tmp_path / "gce.yaml"  # the `gpu` pool belongs to GCE experiments
    gce_file.write_text(
        (TESTS_DIR / "experiments" / "gce.yaml").read_text() + "\nsweep: {max_gpu_in_flight: 3}\n"
    )
    (tmp_path / "home").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "home")) as instance:
        set_pool_limits(instance, load_experiment(gce_file))
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 3
    from lab_assets.defs.assets import build_assets
    from lab_assets.defs.partitions import build_partitions

    adapter = next(a for a in build_assets(exp, build_partitions(exp)) if a.key.path == ["adapter"])
    assert adapter.op.pool == "cpu"  # local compute: the `cpu` pool (GCE: `gpu`)


def test_what_a_requested_backfill_will_build_is_in_flight_and_left_out_of_a_sweep(lab_copy):
    """A second sweep (or one beside a UI backfill) must not plan what is already coming."""
    from lab_assets.orchestration.backfill import submit_backfill
    from lab_assets.orchestration.sweep import in_flight, sweep_targets

    instance = lab_copy["instance"]
    exp = edited_experiment(
        lab_copy["tmp"],
        "{method: dpo, task: arith, seed: 1}",
        "{method: dpo, task: arith, seed: 1, learning_rate: 0.005}",
    )
    targets = sweep_targets(assess(exp, instance, store_for(exp, lab_copy)))
    assert in_flight(instance) == {}
    # no daemon serves this instance: the backfill stays REQUESTED, as one just written
    backfill_id = submit_backfill(instance, exp, targets, "first sweep")
    busy = in_flight(instance)
    assert set(busy) == set(targets)
    assert set(busy.values()) == {f"backfill {backfill_id}"}


def test_the_sweep_lock_holds_a_second_sweep_until_the_first_releases(tmp_path):
    import threading

    from lab_assets.orchestration.sweep import sweep_lock

    order: list[str] = []
    first = sweep_lock(tmp_path)
    first.__enter__()
    second_in = threading.Event()

    def second() -> None:
        with sweep_lock(tmp_path):
            order.append("second")
            second_in.set()

    t = threading.Thread(target=second)
    t.start()
    assert not second_in.wait(0.5)  # blocked while the first holds it
    order.append("first released")
    first.release()
    assert second_in.wait(30)
    t.join()
    assert order == ["first released", "second"]
