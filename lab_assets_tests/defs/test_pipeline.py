"""The whole lab on a small experiment, materialised for real through Dagster.

One module-scoped run of every partition (1 model, 8 adapters), then checks of
what storage holds, what the Dagster instance recorded, and that the artifacts
are what they claim (PEFT-loadable adapters, exact spectra).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance, EventRecordsFilter
from safetensors.numpy import load_file

from lab_assets_tests.conftest import TESTS_DIR, patched_env
from resources.storage.local import LocalArtifactStore

MODEL = "tiny-test"


@pytest.fixture(scope="module")
def lab(small_lab):
    with patched_env(small_lab["env"]), DagsterInstance.get() as instance:
        exp = small_lab["exp"]
        yield {
            **small_lab,
            "instance": instance,
            "store": LocalArtifactStore(small_lab["env"]["LAB_STORAGE_ROOT"], exp.name),
        }


def materializations(instance, asset):
    return instance.get_event_records(
        EventRecordsFilter(DagsterEventType.ASSET_MATERIALIZATION, asset_key=AssetKey(asset))
    )


def test_every_partition_materialised_and_stored(lab):
    exp, store = lab["exp"], lab["store"]
    assert store.list_partitions("base_model") == [MODEL]
    assert store.list_partitions("base_spectrum") == [MODEL]
    keys = sorted(f"{MODEL}|{r}" for r in exp.run_ids)
    assert store.list_partitions("adapter") == keys
    assert store.list_partitions("spectral_features") == keys
    assert store.list_partitions("classification_results") == ["all"]
    for asset in ("base_model", "adapter", "spectral_features"):
        for key in store.list_partitions(asset):
            assert store.verify(asset, key) == []
    base = store.local_path("base_model", MODEL)
    assert {"config.json", "model.safetensors"} <= {p.name for p in base.iterdir()}
    assert os.listdir(lab["root"] / "scratch") == []  # every worker's scratch dir is gone


def test_dagster_recorded_materialisations_checks_and_metadata(lab):
    instance = lab["instance"]
    adapters = materializations(instance, "adapter")
    assert len(adapters) == len(lab["exp"].runs)
    meta = adapters[0].asset_materialization.metadata
    for k in ("first_loss", "final_loss", "steps", "wall_s", "trainable_params", "loss_curve"):
        assert k in meta, k
    assert meta["steps"].value == 4 and meta["trainable_params"].value > 0
    assert meta["loss_curve"].value.startswith("![loss curve](data:image/png;base64,")
    for k in ("task_metric", "base_task_metric", "nll", "base_nll", "reward_accuracy"):
        assert 0 <= meta[f"heldout/{k}"].value, k
    assert isinstance(meta["heldout/beats_base"].value, bool)
    cls = materializations(instance, "classification_results")[0].asset_materialization.metadata
    assert 0 <= cls["method_accuracy"].value <= 1 and cls["method_chance"].value == 0.5
    assert "plot" in cls and "method_confusion" in cls and "method_controls" in cls
    assert cls["p_value_floor"].value == 1 / (10 + 1)  # the small experiment's 10 permutations
    assert "method_verdict" in cls and "task_verdict" in cls
    checks = instance.get_event_records(EventRecordsFilter(DagsterEventType.ASSET_CHECK_EVALUATION))
    n_runs = len(lab["exp"].runs)
    assert len(checks) == 2 + 3 * n_runs + 1
    evaluations = [c.event_log_entry.dagster_event.event_specific_data for c in checks]
    manifest = [e for e in evaluations if e.check_name == "manifest_intact"]
    heldout = [e for e in evaluations if e.check_name == "beats_base_heldout"]
    assert len(manifest) == 2 + 2 * n_runs + 1 and all(e.passed for e in manifest)
    # a science warning, not a failure: 4-step adapters on a 20-step base may not beat it
    assert len(heldout) == n_runs and all(e.severity.value == "WARN" for e in heldout)


def test_worker_logs_reached_the_run(lab):
    instance = lab["instance"]
    run_id = materializations(instance, "adapter")[0].event_log_entry.run_id
    msgs = [e.user_message or "" for e in instance.all_logs(run_id)]
    assert any(m.startswith("launching adapter in a local worker") for m in msgs)
    assert any(m.startswith("training ") for m in msgs)  # logged inside the worker


def test_adapters_load_with_peft_and_change_the_model(lab):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = lab["store"]
    base_dir = store.local_path("base_model", MODEL)
    key = f"{MODEL}|dpo-arith-r4-s0"
    adapter_dir = store.local_path("adapter", key)
    assert {"adapter_model.safetensors", "adapter_config.json", "eval.json"} <= {
        p.name for p in adapter_dir.iterdir()
    }
    evaluation = json.loads((adapter_dir / "eval.json").read_text())
    assert evaluation["method"] == "dpo" and evaluation["task"] == "arith"
    assert evaluation["n"] > 0 and isinstance(evaluation["beats_base"], bool)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, adapter_dir)
        after = tuned(ids).logits
    assert not torch.allclose(before, after)


def test_spectral_features_match_dense_svd_of_the_stored_adapter(lab):
    store = lab["store"]
    key = f"{MODEL}|sft-reverse-r4-s1"
    df = pd.read_parquet(store.local_path("spectral_features", key) / "features.parquet")
    adapter_dir = store.local_path("adapter", key)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / cfg["r"]
    assert len(df) == 2 * 7  # 2 layers × 7 target modules
    for _, row in df.iterrows():
        prefix = f"base_model.model.{row['module']}"
        A = tensors[f"{prefix}.lora_A.weight"].astype(np.float64)
        B = tensors[f"{prefix}.lora_B.weight"].astype(np.float64)
        dense = np.linalg.svd(scale * B @ A, compute_uv=False)[: cfg["r"]]
        got = np.asarray(row["singular_values"])
        assert np.all(np.diff(got) <= 0)
        np.testing.assert_allclose(got, dense, rtol=1e-6, atol=1e-12)
    assert {"model", "run", "method", "task", "seed"} <= set(df.columns)


def test_one_partition_through_the_dagster_cli(lab):
    """The README's single-partition command rematerialises exactly that partition."""
    store = lab["store"]
    key = f"{MODEL}|sft-arith-r4-s0"
    before = store.read_manifest("adapter", key).created_at
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-m",
            "lab_assets.definitions",
            "--select",
            "adapter",
            "--partition",
            key,
        ],
        capture_output=True,
        text=True,
        cwd=TESTS_DIR.parent,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert store.read_manifest("adapter", key).created_at > before
    other = f"{MODEL}|dpo-arith-r4-s0"
    assert len(materializations(lab["instance"], "adapter")) == len(lab["exp"].runs) + 1
    assert store.verify("adapter", other) == []
