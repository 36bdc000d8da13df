"""What each asset's results look like in the Dagster UI: held-out evaluation, spectral
features and classification results as typed, rounded metadata and tables.

Split from ``assets`` so that module holds only the assets themselves; the generic
helpers (``typed``, ``table``, ``frame_table``, ``headline``) are in ``metadata``.
"""

from __future__ import annotations

import pandas as pd
from dagster import MetadataValue

from lab_assets.defs.metadata import frame_table, headline, table, typed


def heldout_metadata(heldout: dict) -> dict:
    """The held-out evaluation as typed metadata (``heldout/…``)."""
    meta: dict = {"heldout/n": MetadataValue.int(int(heldout["n"]))}
    meta["heldout/metric_name"] = MetadataValue.text(str(heldout["metric_name"]))
    for k in (
        "base_task_metric",
        "task_metric",
        "base_nll",
        "nll",
        "base_pref_accuracy",
        "pref_accuracy",
        "reward_accuracy",
        "reward_margin",
    ):
        meta[f"heldout/{k}"] = typed(float(heldout[k]))
    meta["heldout/beats_base"] = MetadataValue.bool(bool(heldout["beats_base"]))
    return meta


def features_metadata(df: pd.DataFrame, seconds: float) -> dict:
    preview = (
        "module",
        "spectral_norm",
        "stable_rank",
        "effective_rank",
        "subspace_overlap",
        "intruder_dims",
    )
    preview_cols = [c for c in preview if c in df.columns]
    return {
        "modules": typed(len(df)),
        "seconds": typed(seconds),
        "mean_stable_rank": typed(float(df["stable_rank"].mean())),
        "max_spectral_norm": typed(float(df["spectral_norm"].max())),
        "preview": frame_table(df[preview_cols], max_rows=20),
    }


def classification_metadata(results: dict) -> dict:
    """Per target: the headline (scale-free) results, the controls beside them, the verdict,
    top features and confusion matrix; the control arms; the p-value floor."""
    floor = float(results["p_value_floor"])
    meta: dict = {
        "headline": MetadataValue.text(
            "; ".join(headline(t, results[t], floor) for t in ("method", "task"))
        ),
        "headline_feature_set": typed(str(results["headline_feature_set"])),
        "p_value_floor": typed(floor),
        "n_permutations": typed(int(results["n_permutations"])),
    }
    for target in ("method", "task"):
        res = results[target]
        meta[f"{target}_headline"] = MetadataValue.text(headline(target, res, floor))
        for k in ("accuracy", "chance", "p_value", "ci_low", "ci_high"):
            meta[f"{target}_{k}"] = typed(None if res[k] is None else float(res[k]))
        meta[f"{target}_model"] = typed(str(res["model"]))
        meta[f"{target}_cv"] = typed(f"{res['cv']}, {res['model']}, scale-free features")
        verdict = results["verdicts"][target]
        statement = verdict["statement"]
        if "at_matched_norm" in verdict:
            statement += f"; {verdict['at_matched_norm']}"
        meta[f"{target}_verdict"] = MetadataValue.text(statement)
        meta[f"{target}_explained_by_norm"] = typed(bool(verdict["explained_by_norm"]))
        meta[f"{target}_controls"] = table(_SCORE_COLUMNS, _scores(results["feature_sets"][target]))
        meta[f"{target}_top_features"] = table(
            [("feature", str), ("importance", float)], res["top_features"][:10]
        )
        meta[f"{target}_confusion"] = table(
            [("true / predicted", str), *((str(lab), int) for lab in res["labels"])],
            [[lab, *row] for lab, row in zip(res["labels"], res["confusion"], strict=True)],
        )
    rows = []
    for arm, comp in results["control_arms"].items():
        scored = {n: r for n, r in comp["feature_sets"].items() if "accuracy" in r}
        rows += [[arm, comp["question"], *row] for row in _scores(scored)]
    if rows:
        meta["control_arms"] = table([("arm", str), ("question", str), *_SCORE_COLUMNS], rows)
    return meta


_SCORE_COLUMNS = [
    ("features", str),
    ("accuracy", float),
    ("ci_low", float),
    ("ci_high", float),
    ("p_value", float),
]


def _scores(by_feature_set: dict) -> list[list]:
    """One row per feature set: name, accuracy, 95% CI bounds, permutation p-value."""
    return [
        [name, r["accuracy"], r["ci_low"], r["ci_high"], r["p_value"]]
        for name, r in by_feature_set.items()
    ]
