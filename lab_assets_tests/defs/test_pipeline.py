"""The whole lab on a small experiment, materialised for real through Dagster.

One module-scoped run of every partition (1 model, 8 adapters), then checks of
what storage holds, what the Dagster instance recorded, and that the artifacts
are what they claim (PEFT-loadable adapters, exact spectra).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    EventRecordsFilter,
    FloatMetadataValue,
    IntMetadataValue,
    PathMetadataValue,
    TableMetadataValue,
    TextMetadataValue,
)
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
    method = meta["hp/method"].value
    for k in (f"loss/{method}/first", f"loss/{method}/final", "steps", "wall_s", "loss_curve"):
        assert k in meta, k
    assert meta["steps"].value == 4 and meta["trainable_params"].value > 0
    assert isinstance(meta["loss_curve"], PathMetadataValue)
    for k in ("task_metric", "base_task_metric", "nll", "base_nll", "reward_accuracy"):
        assert 0 <= meta[f"heldout/{k}"].value, k
    assert isinstance(meta["heldout/beats_base"].value, bool)
    cls = materializations(instance, "classification_results")[0].asset_materialization.metadata
    assert 0 <= cls["method_accuracy"].value <= 1 and cls["method_chance"].value == 0.5
    assert "plot" in cls and "method_confusion" in cls and "method_controls" in cls
    for k in ("method_confusion", "method_controls", "method_top_features", "task_controls"):
        assert isinstance(cls[k], TableMetadataValue), k
    controls = cls["method_controls"].value
    assert [c.name for c in controls.schema.columns][:2] == ["features", "accuracy"]
    assert {r.data["features"] for r in controls.records} >= {"scale_free", "norm_only"}
    # the small experiment's 10 permutations, to 4 significant digits
    assert cls["p_value_floor"].value == pytest.approx(1 / (10 + 1), rel=1e-3)
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


def test_every_adapter_carries_typed_hyper_parameters_and_per_method_loss(lab):
    runs = {r.id: r for r in lab["exp"].runs}
    for rec in materializations(lab["instance"], "adapter"):
        meta = rec.asset_materialization.metadata
        run = runs[rec.asset_materialization.partition.split("|", 1)[1]]
        assert isinstance(meta["hp/learning_rate"], FloatMetadataValue)
        assert meta["hp/learning_rate"].value == run.hyper.learning_rate
        assert isinstance(meta["hp/rank"], IntMetadataValue) and meta["hp/rank"].value == 4
        for k in ("steps", "batch_size", "seed", "n_examples"):
            assert isinstance(meta[f"hp/{k}"], IntMetadataValue), k
        for k in ("alpha", "dpo_beta"):
            assert isinstance(meta[f"hp/{k}"], FloatMetadataValue), k
        assert isinstance(meta["hp/method"], TextMetadataValue)
        assert meta["hp/method"].value == run.method and meta["hp/task"].value == run.task
        assert "q_proj" in meta["hp/target_modules"].value
        # one loss key per method: SFT's and DPO's losses never share a plotted line
        other = "dpo" if run.method == "lora_sft" else "lora_sft"
        assert f"loss/{run.method}/final" in meta and f"loss/{other}/final" not in meta
        assert "first_loss" not in meta and "final_loss" not in meta
        for v in meta.values():  # every float rounded to 4 significant digits
            if isinstance(v, FloatMetadataValue) and v.value:
                assert v.value == float(f"{v.value:.4g}"), v


def test_classification_headline_is_one_line_per_target(lab):
    cls = materializations(lab["instance"], "classification_results")[0].asset_materialization
    meta = cls.metadata
    number = r"\d\.\d{3} \[\d\.\d\d, \d\.\d\d\], p (< 0\.091|= \d\.\d{3})"
    assert re.fullmatch(rf"method {number} vs chance 0\.500", meta["method_headline"].value)
    assert re.fullmatch(rf"task {number} vs chance \d\.\d{{3}}", meta["task_headline"].value)
    assert meta["headline"].value.startswith(meta["method_headline"].value + "; task ")


def test_plots_are_stored_files_in_the_manifest_linked_by_path(lab):
    store = lab["store"]
    key = f"{MODEL}|sft-arith-r4-s0"
    for asset, partition, meta_key, name in (
        ("adapter", key, "loss_curve", "loss_curve.png"),
        ("base_model", MODEL, "pretrain_loss_curve", "pretrain_loss.png"),
        ("classification_results", None, "plot", "classification.png"),
    ):
        manifest = store.read_manifest(asset, partition)
        assert name in {f.path for f in manifest.files}, (asset, name)
        rec = [
            r
            for r in materializations(lab["instance"], asset)
            if r.asset_materialization.partition == partition
        ][-1]
        meta = rec.asset_materialization.metadata
        stored = store.local_path(asset, partition)
        assert isinstance(meta[meta_key], PathMetadataValue)
        assert meta[meta_key].value == str(stored / name)
        assert (stored / name).read_bytes().startswith(b"\x89PNG")
        assert isinstance(meta["storage_uri"], PathMetadataValue)
        assert meta["storage_uri"].value == str(stored)
        assert not any("base64" in str(getattr(v, "value", "")) for v in meta.values())


def test_fetched_adapter_loads_with_peft_without_the_storage_root(lab, tmp_path):
    """The config names its base portably; the card says how to load it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lab_assets.cli.main import main
    from lab_assets.ml.adapter_io import resolve_base_model

    exp = lab["exp"]
    storage = tmp_path / "storage"  # a copy: the module's storage stays for other tests
    shutil.copytree(Path(lab["env"]["LAB_STORAGE_ROOT"]) / exp.name, storage / exp.name)
    dest = tmp_path / "fetched"
    args = ["fetch", "--storage", str(storage), "--dest", str(dest), "--include", "adapters"]
    assert main([*args, "--no-progress"]) == 0
    shutil.rmtree(storage)  # the machine that trained it is gone
    adapter_dir = dest / "adapter" / f"{MODEL}+dpo-arith-r4-s0"  # shell-safe folder name
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == f"../../base_model/{MODEL}"
    card = (adapter_dir / "README.md").read_text()
    front = card.split("---\n")[1]
    assert f'base_model: "../../base_model/{MODEL}"' in front
    assert "library_name: peft" in front and '- "dpo"' in front
    assert "| learning_rate |" in card and "| adapter, task metric |" in card
    base = AutoModelForCausalLM.from_pretrained(resolve_base_model(adapter_dir))
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        after = PeftModel.from_pretrained(base, adapter_dir)(ids).logits
    assert not torch.allclose(before, after)


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
    assert {"adapter_model.safetensors", "adapter_config.json", "eval.json", "README.md"} <= {
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
