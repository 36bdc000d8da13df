"""The experiment's asset graph, built from one experiment file.

    base_model[model] ─► base_spectrum[model] ──────────────┐
          │                    ┆ (order only)                 ▼
          └──────────► adapter[model × run] ─► spectral_features[model × run] ─► classification_results

Every asset writes real files into a scratch directory and returns it; the IO
manager commits it to storage with a manifest, then the asset's integrity check
(``checks.py``) re-reads what was stored. Each output carries its recipe
(``recipe_output.py``). Adapter training runs through the step launcher, so the
same code runs in a local worker or on a GCE VM. One factory per asset.
"""

import json
import shutil
import time
import warnings
from pathlib import Path

import pandas as pd
from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    BetaWarning,
    MultiToSingleDimensionPartitionMapping,
    asset,
)

from lab_assets.defs.checks import (
    heldout_check_result,
    heldout_check_spec,
    manifest_check_result,
    manifest_check_specs,
)
from lab_assets.defs.metadata import (
    line_plot_png,
    prefixed,
    save_plot,
    stored_file,
    table,
    typed,
)
from lab_assets.defs.partitions import LabPartitions
from lab_assets.defs.recipe_output import output_with_recipe
from lab_assets.defs.result_metadata import (
    classification_metadata,
    features_metadata,
    heldout_metadata,
)
from lab_assets.defs.scratch import output_dir
from lab_assets.experiment.keys import split_adapter_key
from lab_assets.experiment.resolved import Experiment, RunSpec
from lab_assets.experiment.schema import TinySource
from lab_assets.experiment.versions import CODE_VERSIONS
from lab_assets.names import (
    ADAPTER,
    ASSET_GROUP,
    BASE_MODEL,
    BASE_SPECTRUM,
    CLASSIFICATION,
    SPECTRAL_FEATURES,
)
from lab_assets.orchestration.instance import pool_for
from resources.io_manager import LabStorage
from resources.model_cache import ModelCache
from resources.remote.checkpointing import (
    discard_local_checkpoints,
    local_checkpointing,
    preemptible_training,
)
from resources.storage.base import partition_dirname

BASE_SPECTRUM_FILE = "base_spectrum.safetensors"
FEATURES_FILE = "features.parquet"
EVAL_FILE = "eval.json"
PRETRAIN_PLOT = "pretrain_loss.png"
LOSS_PLOT = "loss_curve.png"
CLASSIFICATION_PLOT = "classification.png"


def build_assets(exp: Experiment, parts: LabPartitions) -> list[AssetsDefinition]:
    with warnings.catch_warnings():
        # Beta in 1.13, and the documented way to map model × run onto model.
        warnings.simplefilter("ignore", BetaWarning)
        by_model = MultiToSingleDimensionPartitionMapping(partition_dimension_name="model")
    return [
        _base_model_asset(exp, parts),
        _base_spectrum_asset(exp, parts),
        _adapter_asset(exp, parts, by_model),
        _spectral_features_asset(exp, parts, by_model),
        _classification_asset(exp),
    ]


def _base_model_asset(exp: Experiment, parts: LabPartitions) -> AssetsDefinition:
    @asset(
        name=BASE_MODEL,
        partitions_def=parts.models,
        group_name=ASSET_GROUP,
        code_version=CODE_VERSIONS[BASE_MODEL],
        check_specs=manifest_check_specs(BASE_MODEL),
        kinds={"pytorch"},
        description="Base model weights + tokenizer in Hugging Face layout (safetensors).",
    )
    def base_model(
        context: AssetExecutionContext, lab_storage: LabStorage, model_cache: ModelCache
    ):
        model_id = context.partition_key
        spec = exp.model(model_id)
        meta: dict = {
            "lab/fingerprint": exp.model_fingerprint(model_id),
            "source": spec.source.kind,
        }
        with output_dir(BASE_MODEL) as out:
            if isinstance(spec.source, TinySource):
                from lab_assets.ml.tiny_model import TinyModelSpec, build_tiny_model

                src = spec.source.model_dump(exclude={"kind"})
                metrics = build_tiny_model(out, TinyModelSpec(**src), log=context.log.info)
                png = line_plot_png(metrics["loss_curve"], f"{model_id} pre-training", "loss")
                meta |= {
                    "n_params": typed(int(metrics["n_params"])),
                    "loss/pretrain/first": typed(float(metrics["first_loss"])),
                    "loss/pretrain/final": typed(float(metrics["final_loss"])),
                    "pretrain_wall_s": typed(float(metrics["wall_s"])),
                    "pretrain_loss_curve": save_plot(
                        png, out, PRETRAIN_PLOT, lab_storage, BASE_MODEL, model_id
                    ),
                } | prefixed("hp", src)
            else:
                fetched = model_cache.fetch(
                    spec.source.repo_id, spec.source.revision, log=context.log.info
                )
                shutil.copytree(fetched.path, out, dirs_exist_ok=True)
                meta |= {
                    "repo_id": spec.source.repo_id,
                    "revision": spec.source.revision,
                    "cache_tier": fetched.tier,
                    "fetch_seconds": typed(float(fetched.seconds)),
                    "cache_tiers_skipped": "; ".join(fetched.skipped) or "none",
                }
        yield output_with_recipe(exp, lab_storage, BASE_MODEL, model_id, out, meta)
        yield manifest_check_result(lab_storage, BASE_MODEL, model_id)

    return base_model


def _base_spectrum_asset(exp: Experiment, parts: LabPartitions) -> AssetsDefinition:
    @asset(
        name=BASE_SPECTRUM,
        partitions_def=parts.models,
        group_name=ASSET_GROUP,
        code_version=CODE_VERSIONS[BASE_SPECTRUM],
        check_specs=manifest_check_specs(BASE_SPECTRUM),
        description=(
            "Singular triplets of every targeted base weight matrix: all of them up to "
            "1024 on the smaller side, else the top k (spectrum.base_k sets the number)."
        ),
    )
    def base_spectrum(context: AssetExecutionContext, lab_storage: LabStorage, base_model: Path):
        from lab_assets.ml.base_weights import FULL_SPECTRUM_MAX_DIM
        from lab_assets.ml.spectral import compute_base_spectrum, save_base_spectrum

        sp = exp.file.spectrum
        # by default: every triplet of weights up to FULL_SPECTRUM_MAX_DIM, top_k of others
        k, full_up_to = sp.top_k, FULL_SPECTRUM_MAX_DIM
        if sp.base_k is not None:
            k, full_up_to = max(sp.base_k, sp.top_k), 0
        t0 = time.perf_counter()
        spectra = compute_base_spectrum(base_model, exp.target_modules(), k, full_up_to=full_up_to)
        seconds = time.perf_counter() - t0
        with output_dir(BASE_SPECTRUM) as out:
            save_base_spectrum(spectra, out / BASE_SPECTRUM_FILE)
        rows = [(name, float(s.S[0]), len(s.S)) for name, s in list(spectra.items())[:50]]
        meta = {
            "modules": typed(len(spectra)),
            "top_k": typed(sp.top_k),
            "stored_triplets": typed(f"all up to {full_up_to}, else {k}" if full_up_to else k),
            "seconds": typed(seconds),
            "top_singular_values": table([("module", str), ("σ1", float), ("k", int)], rows),
        }
        key = context.partition_key
        yield output_with_recipe(exp, lab_storage, BASE_SPECTRUM, key, out, meta)
        yield manifest_check_result(lab_storage, BASE_SPECTRUM, key)

    return base_spectrum


def _adapter_asset(
    exp: Experiment, parts: LabPartitions, by_model: MultiToSingleDimensionPartitionMapping
) -> AssetsDefinition:
    @asset(
        name=ADAPTER,
        partitions_def=parts.adapters,
        group_name=ASSET_GROUP,
        code_version=CODE_VERSIONS[ADAPTER],
        check_specs=[*manifest_check_specs(ADAPTER), heldout_check_spec(ADAPTER)],
        ins={BASE_MODEL: AssetIn(partition_mapping=by_model)},
        # Order only (nothing is read from it, and it is not in the adapter's recipe): a
        # backfill requests an adapter once its model's spectrum exists too, so each
        # adapter and its spectral features go in one run instead of two.
        deps=[AssetDep(BASE_SPECTRUM, partition_mapping=by_model)],
        required_resource_keys={"step_launcher", "lab_storage"},
        pool=pool_for(exp),
        kinds={"pytorch"},
        description=(
            "One LoRA training run (lora_sft or dpo) in PEFT layout, with its held-out "
            "evaluation against the base (eval.json). Waits for its model's "
            "`base_spectrum` only so that a backfill trains it and measures its spectrum "
            "in one run; nothing of the spectrum enters training or the adapter's recipe."
        ),
    )
    def adapter(context: AssetExecutionContext, base_model: Path):
        from lab_assets.ml.controls import SHUFFLED_PREFERENCES
        from lab_assets.ml.evaluate import evaluate_heldout
        from lab_assets.ml.model_card import write_model_card
        from lab_assets.ml.train import TrainSpec, train_adapter

        model_id, run_id = split_adapter_key(context.partition_key)
        run = exp.run(run_id)
        spec = TrainSpec(
            method=run.method,
            task=run.task,
            seed=run.seed,
            shuffle_preferences=run.arm == SHUFFLED_PREFERENCES,
            **run.hyper.model_dump(),
        )
        context.log.info(f"training {run_id} on {model_id}: {spec}")
        # on a VM: the agent's checkpoints; locally: a durable directory of our own
        identity = f"{spec}|{exp.model_fingerprint(model_id)}"
        ckpt = preemptible_training() or local_checkpointing(
            context.partition_key, identity, spec.steps
        )
        base_name, base_revision = _base_reference(exp, model_id)
        with output_dir(ADAPTER) as out:
            result = train_adapter(
                base_model,
                out,
                spec,
                log=context.log.info,
                log_every_s=1.0,  # each line is an event in the run's log
                base_model_name=base_name,
                base_model_revision=base_revision,
                **ckpt,
            )
            t0 = time.perf_counter()
            heldout = evaluate_heldout(
                base_model, out, run.method, run.task, dpo_beta=spec.dpo_beta
            ).to_dict()
            heldout["seconds"] = round(time.perf_counter() - t0, 3)
            (out / EVAL_FILE).write_text(json.dumps(heldout, indent=1))
            hyper = _hyper_parameters(run)
            write_model_card(
                out,
                title=f"{run_id} on {model_id}",
                base_model=base_name,
                base_revision=base_revision,
                hyper=hyper,
                heldout=heldout,
                tags=(run.method, run.task, run.arm),
            )
            storage, key = context.resources.lab_storage, context.partition_key
            curve = [float(x) for x in result.loss_curve]
            plot = line_plot_png(curve, f"{run_id} ({run.method})", "loss")
            plot_link = save_plot(plot, out, LOSS_PLOT, storage, ADAPTER, key)
        context.log.info(f"held-out evaluation: {heldout}")
        # Loss keys per method: the UI's Plots tab draws one line per key across partitions,
        # and SFT's cross-entropy (~4.7) and DPO's sigmoid loss (~0.69) are not comparable.
        loss = f"loss/{run.method}"
        meta = (
            prefixed("hp", hyper)
            | {
                f"{loss}/first": typed(float(result.first_loss)),
                f"{loss}/final": typed(float(result.final_loss)),
                "steps": typed(int(result.steps)),
                "wall_s": typed(float(result.wall_s)),
                "trainable_params": typed(int(result.trainable_params)),
                "device": typed(result.device),
                "precision": typed(result.precision),
                "base_model": typed(base_name),
                "loss_curve": plot_link,
            }
            | heldout_metadata(heldout)
        )
        from lab_assets.defs.tracking import track_adapter  # MLflow; never fails the step

        meta |= track_adapter(context, exp, run, result, heldout, storage.store.uri(ADAPTER, key))
        yield output_with_recipe(exp, storage, ADAPTER, key, out, meta)
        discard_local_checkpoints(ckpt)  # the adapter is stored: nothing to resume
        yield manifest_check_result(storage, ADAPTER, key)
        yield heldout_check_result(heldout)

    return adapter


def _base_reference(exp: Experiment, model_id: str) -> tuple[str, str | None]:
    """How an adapter's config names its base: the Hub repo id and revision, or the lab's
    own base as a path relative to the adapter's directory (``../../base_model/<model>``),
    valid in storage and in what ``lab fetch`` writes."""
    source = exp.model(model_id).source
    if isinstance(source, TinySource):
        return f"../../{BASE_MODEL}/{partition_dirname(model_id)}", None
    return source.repo_id, source.revision


def _hyper_parameters(run: RunSpec) -> dict:
    """What an adapter was made with: method, task, seed, arm and every training field."""
    return {"method": run.method, "task": run.task, "seed": run.seed, "arm": run.arm} | dict(
        run.hyper.model_dump()
    )


def _spectral_features_asset(
    exp: Experiment, parts: LabPartitions, by_model: MultiToSingleDimensionPartitionMapping
) -> AssetsDefinition:
    @asset(
        name=SPECTRAL_FEATURES,
        partitions_def=parts.adapters,
        group_name=ASSET_GROUP,
        code_version=CODE_VERSIONS[SPECTRAL_FEATURES],
        check_specs=manifest_check_specs(SPECTRAL_FEATURES),
        ins={
            ADAPTER: AssetIn(),
            BASE_SPECTRUM: AssetIn(partition_mapping=by_model),
            BASE_MODEL: AssetIn(partition_mapping=by_model),
        },
        kinds={"pandas", "parquet"},
        description="Per-module spectral features of ΔW = scale·B@A and of its relation to the base.",
    )
    def spectral_features(
        context: AssetExecutionContext,
        lab_storage: LabStorage,
        adapter: Path,
        base_spectrum: Path,
        base_model: Path,
    ):
        from threadpoolctl import threadpool_limits

        from lab_assets.ml.spectral import adapter_spectrum, load_base_spectrum

        model_id, run_id = split_adapter_key(context.partition_key)
        run = exp.run(run_id)
        t0 = time.perf_counter()
        spectra = load_base_spectrum(base_spectrum / BASE_SPECTRUM_FILE)
        sp = exp.file.spectrum
        # Small SVDs, two runs at a time on shared cores: BLAS threads only contend.
        with threadpool_limits(1):
            df = adapter_spectrum(
                adapter,
                base_dir=base_model,
                base_spectrum=spectra,
                top_k=sp.top_k,
                intruder_k=sp.intruder_k,
                intruder_threshold=sp.intruder_threshold,
            )
        df.insert(1, "model", model_id)
        df.insert(2, "run", run_id)
        df.insert(3, "method", run.method)
        df.insert(4, "task", run.task)
        df.insert(5, "seed", run.seed)
        seconds = time.perf_counter() - t0
        with output_dir(SPECTRAL_FEATURES) as out:
            df.to_parquet(out / FEATURES_FILE, index=False)
        key = context.partition_key
        meta = features_metadata(df, seconds)
        yield output_with_recipe(exp, lab_storage, SPECTRAL_FEATURES, key, out, meta)
        yield manifest_check_result(lab_storage, SPECTRAL_FEATURES, key)

    return spectral_features


def _classification_asset(exp: Experiment) -> AssetsDefinition:
    @asset(
        name=CLASSIFICATION,
        group_name=ASSET_GROUP,
        code_version=CODE_VERSIONS[CLASSIFICATION],
        check_specs=manifest_check_specs(CLASSIFICATION),
        ins={SPECTRAL_FEATURES: AssetIn()},
        kinds={"scikitlearn"},
        description=(
            "Method and task classified from scale-free spectral features with grouped CV, "
            "beside the controls (norm only, norm-matched random ΔW, all features) and the "
            "control arms (DPO on shuffled preferences, norm-matched SFT)."
        ),
    )
    def classification_results(
        context: AssetExecutionContext,
        lab_storage: LabStorage,
        spectral_features: dict[str, Path],
    ):
        from lab_assets.ml.classify import feature_matrix, plot_report
        from lab_assets.ml.controls import classify_with_controls

        frames = {
            key: pd.read_parquet(path / FEATURES_FILE)
            for key, path in sorted(spectral_features.items())
        }
        labels = pd.DataFrame([_labels(exp, key) for key in sorted(frames)], index=sorted(frames))
        n_perm = exp.file.classification.n_permutations
        t0 = time.perf_counter()
        plotted, results = classify_with_controls(frames, labels, n_perm)
        seconds = time.perf_counter() - t0
        X = feature_matrix(frames)
        meta: dict = {
            "adapters": typed(len(X)),
            "features": typed(int(X.shape[1])),
            "seconds": typed(seconds),
        }
        with output_dir(CLASSIFICATION) as out:
            plot_report(plotted, out / CLASSIFICATION_PLOT)
            (out / "results.json").write_text(json.dumps(results, indent=1))
            X.assign(**{c: labels[c] for c in ("method", "task", "group", "arm")}).to_parquet(
                out / "feature_matrix.parquet"
            )
            meta["plot"] = stored_file(lab_storage, CLASSIFICATION, None, CLASSIFICATION_PLOT)
        meta |= classification_metadata(results)
        yield output_with_recipe(exp, lab_storage, CLASSIFICATION, None, out, meta)
        yield manifest_check_result(lab_storage, CLASSIFICATION, None)

    return classification_results


def _labels(exp: Experiment, key: str) -> dict:
    model_id, run_id = split_adapter_key(key)
    run = exp.run(run_id)
    return {
        "method": run.method,
        "task": run.task,
        "group": f"{model_id}/s{run.seed}",
        "arm": run.arm,
    }
