"""Controls for the classification: is a spectral signature more than a norm?

A classifier that tells SFT from DPO adapters may only be reading how *big* the
update is (the two methods move weights by very different amounts), which says
nothing about the geometry of fine-tuning. So every target is classified, with
the same grouped CV, Wilson CI and permutation test, from four feature sets:

* ``scale_free`` (the headline): features invariant to multiplying ΔW by a
  constant: the top singular values over ‖ΔW‖_F, stable and effective rank,
  and the overlaps of ΔW's singular subspaces with the base's.
* ``all``: every feature, norms included.
* ``norm_only``: one scalar per adapter, log10 ‖ΔW‖_F over all its modules.
* ``random_delta``: every feature of a norm-matched random update: per module a
  Gaussian ``B @ A`` of the adapter's rank and shapes, scaled to the module's
  ‖ΔW‖_F. It keeps the norms and nothing else, so what it classifies, norms do.

And the experiment can add control *arms* (runs with ``arm:`` set):

* ``shuffled_preferences``: DPO on preferences whose chosen and rejected answers
  were swapped at random; real DPO is classified against it (can the spectra
  tell whether the preferences meant anything?) and its task is classified too.
* ``norm_matched_lr``: SFT at a learning rate chosen so that its update norm
  matches DPO's; it is classified against DPO (shape, with the norm taken away).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

MAIN_ARM = "main"
SHUFFLED_PREFERENCES = "shuffled_preferences"
NORM_MATCHED_LR = "norm_matched_lr"
ARMS: tuple[str, ...] = (MAIN_ARM, SHUFFLED_PREFERENCES, NORM_MATCHED_LR)
ARM_SLUG = {SHUFFLED_PREFERENCES: "shuf", NORM_MATCHED_LR: "normlr"}

SCALE_FREE_FEATURES = (
    "sv1_norm",
    "sv2_norm",
    "sv3_norm",
    "sv4_norm",
    "stable_rank",
    "effective_rank",
    "subspace_overlap",
    "subspace_overlap_right",
)
NORM_FEATURE = "log10_total_fro_norm"
FEATURE_SETS = ("scale_free", "all", "norm_only", "random_delta")


def scale_free_columns(X: pd.DataFrame) -> pd.DataFrame:
    """The columns of a ``classify.feature_matrix`` that do not change when ΔW is scaled."""
    return X[[c for c in X.columns if c.rsplit(".", 1)[-1] in SCALE_FREE_FEATURES]]


def total_fro_norm(frame: pd.DataFrame) -> float:
    """‖ΔW‖_F of a whole adapter: the root of the sum of its modules' squared norms."""
    return float(np.sqrt(np.sum(np.square(frame["fro_norm"].to_numpy(dtype=np.float64)))))


def norm_only(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One column, ``log10_total_fro_norm``, one row per adapter."""
    values = {k: math.log10(max(total_fro_norm(f), 1e-300)) for k, f in frames.items()}
    return pd.DataFrame({NORM_FEATURE: pd.Series(values)}, dtype=np.float64)


def random_delta_frames(frames: dict[str, pd.DataFrame], seed: int = 0) -> dict[str, pd.DataFrame]:
    """Per adapter, a spectrum frame of a random update with the same modules, ranks and norms.

    Each module's ``ΔW`` is replaced by ``B @ A`` with standard Gaussian factors of the
    module's rank and shape, rescaled to the module's ``fro_norm``. Only the columns that
    need ΔW alone are filled (singular values, norms, stable and effective rank).
    """
    from lab_assets.ml.spectral import effective_rank
    from lab_assets.ml.svd import lora_singular_values

    rng = np.random.default_rng(seed)
    out: dict[str, pd.DataFrame] = {}
    for key in sorted(frames):
        rows = []
        for _, row in frames[key].iterrows():
            r, n_out, n_in = int(row["rank"]), int(row["out_features"]), int(row["in_features"])
            A = rng.standard_normal((r, n_in))
            B = rng.standard_normal((n_out, r))
            S = np.asarray(lora_singular_values(A, B, 1.0), dtype=np.float64)
            fro = float(row["fro_norm"])
            S = S * (fro / float(np.sqrt(np.sum(S**2)))) if fro > 0 else S * 0.0
            spec = float(S[0]) if S.size else 0.0
            rows.append(
                {
                    "module": row["module"],
                    "singular_values": [float(x) for x in S],
                    "fro_norm": fro,
                    "spectral_norm": spec,
                    "stable_rank": fro**2 / spec**2 if spec > 0 else math.nan,
                    "effective_rank": effective_rank(S),
                }
            )
        out[key] = pd.DataFrame(rows)
    return out


@dataclass
class Verdict:
    """How the headline (scale-free) accuracy of a target compares with its controls."""

    target: str
    scale_free: float
    norm_only: float
    random_delta: float
    all_features: float
    margin_over_norm: float
    margin_over_random: float
    beats_controls: bool  # the scale-free CI lies above both controls' CIs
    explained_by_norm: bool  # one norm scalar reaches the all-feature accuracy's CI
    statement: str


def verdict(target: str, reports: dict[str, Any]) -> Verdict:
    """Compare ``reports`` (feature set → ``ClassificationReport``) for one target."""
    sf, norm, rnd, full = (reports[k] for k in ("scale_free", "norm_only", "random_delta", "all"))
    beats = sf.ci_low > max(norm.ci_high, rnd.ci_high)
    by_norm = norm.accuracy >= full.ci_low
    words = [
        f"{target}: scale-free accuracy {sf.accuracy:.3f} (95% CI {sf.ci_low:.2f}-"
        f"{sf.ci_high:.2f}) vs norm-only {norm.accuracy:.3f} and norm-matched random ΔW "
        f"{rnd.accuracy:.3f}: "
        + (
            "beats both controls by a margin outside the CIs"
            if beats
            else "does NOT beat both controls by a margin outside the CIs"
        )
    ]
    if by_norm:
        words.append(
            f"the all-feature accuracy {full.accuracy:.3f} is explained by norm alone "
            f"(one scalar, log ‖ΔW‖_F, reaches {norm.accuracy:.3f})"
        )
    return Verdict(
        target=target,
        scale_free=sf.accuracy,
        norm_only=norm.accuracy,
        random_delta=rnd.accuracy,
        all_features=full.accuracy,
        margin_over_norm=sf.accuracy - norm.accuracy,
        margin_over_random=sf.accuracy - rnd.accuracy,
        beats_controls=bool(beats),
        explained_by_norm=bool(by_norm),
        statement="; ".join(words),
    )


def feature_sets(
    X: pd.DataFrame, frames: dict[str, pd.DataFrame], seed: int = 0
) -> dict[str, pd.DataFrame]:
    """The four feature matrices of ``FEATURE_SETS`` for the adapters in ``frames``."""
    from lab_assets.ml.classify import feature_matrix

    return {
        "scale_free": scale_free_columns(X),
        "all": X,
        "norm_only": norm_only(frames).reindex(X.index),
        "random_delta": feature_matrix(random_delta_frames(frames, seed)).reindex(X.index),
    }


def _arm_comparison(
    X: pd.DataFrame,
    frames: dict[str, pd.DataFrame],
    y: pd.Series,
    groups: pd.Series,
    question: str,
    n_permutations: int,
    seed: int,
) -> dict[str, Any]:
    """``y`` classified from the scale-free, all and norm-only features of ``y.index``."""
    from lab_assets.ml.classify import classify, report_to_dict

    keys = list(y.index)
    sets = feature_sets(X.loc[keys], {k: frames[k] for k in keys}, seed)
    out: dict[str, Any] = {"question": question, "n_adapters": len(keys), "feature_sets": {}}
    for name in ("scale_free", "all", "norm_only"):
        try:
            report = classify(sets[name], y, groups.loc[keys], n_permutations, seed)
            out["feature_sets"][name] = report_to_dict(report)
        except ValueError as exc:  # too few groups or classes in this comparison
            out["feature_sets"][name] = {"error": str(exc)}
    norms = {k: total_fro_norm(frames[k]) for k in keys}
    out["median_total_fro_norm"] = {
        str(label): float(np.median([norms[k] for k in y.index[y == label]]))
        for label in sorted(y.unique())
    }
    return out


def classify_with_controls(
    frames: dict[str, pd.DataFrame], labels: pd.DataFrame, n_permutations: int, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The headline classification, its controls and the control arms.

    ``frames``: adapter id → its ``spectral.adapter_spectrum`` frame; ``labels``: per
    adapter id ``method``, ``task``, ``group`` (the CV group) and ``arm``. Returns the
    ``ClassificationReport`` objects worth plotting and a JSON-able results dict:
    ``method``/``task`` (the headline: main-arm adapters, scale-free features),
    ``feature_sets`` and ``verdicts`` per target, ``control_arms``, ``p_value_floor``.
    """
    from lab_assets.ml.classify import classify, feature_matrix, report_to_dict

    X = feature_matrix(frames)
    labels = labels.reindex(X.index)
    main = list(labels.index[labels["arm"] == MAIN_ARM])
    sets = feature_sets(X.loc[main], {k: frames[k] for k in main}, seed)
    group = labels["group"]
    results: dict[str, Any] = {
        "headline_feature_set": "scale_free",
        "n_permutations": int(n_permutations),
        "p_value_floor": 1.0 / (n_permutations + 1),
        "feature_sets": {},
        "verdicts": {},
    }
    plotted: dict[str, Any] = {}
    for target in ("method", "task"):
        y = labels.loc[main, target]
        reports = {
            n: classify(F, y, group.loc[main], n_permutations, seed) for n, F in sets.items()
        }
        results[target] = report_to_dict(reports["scale_free"]) | {"feature_set": "scale_free"}
        results["feature_sets"][target] = {n: report_to_dict(r) for n, r in reports.items()}
        results["verdicts"][target] = asdict(verdict(target, reports))
        plotted[f"{target}, scale-free features"] = reports["scale_free"]
        plotted[f"{target}, norm only"] = reports["norm_only"]

    arms: dict[str, Any] = {}
    real_dpo = labels.index[(labels["arm"] == MAIN_ARM) & (labels["method"] == "dpo")]
    shuffled = labels.index[labels["arm"] == SHUFFLED_PREFERENCES]
    if len(shuffled):
        keys = real_dpo.append(shuffled)
        y = pd.Series(["dpo"] * len(real_dpo) + ["dpo_shuffled"] * len(shuffled), index=keys)
        arms[SHUFFLED_PREFERENCES] = _arm_comparison(
            X, frames, y, group, "DPO vs DPO on randomly swapped preferences",
            n_permutations, seed,
        )  # fmt: skip
        try:
            task = classify(
                scale_free_columns(X.loc[shuffled]),
                labels.loc[shuffled, "task"],
                group.loc[shuffled],
                n_permutations,
                seed,
            )
            arms[SHUFFLED_PREFERENCES]["task_scale_free"] = report_to_dict(task)
        except ValueError as exc:
            arms[SHUFFLED_PREFERENCES]["task_scale_free"] = {"error": str(exc)}
    matched = labels.index[labels["arm"] == NORM_MATCHED_LR]
    if len(matched):
        keys = matched.append(real_dpo)
        y = labels.loc[keys, "method"]
        arms[NORM_MATCHED_LR] = _arm_comparison(
            X, frames, y, group, "SFT at a norm-matching learning rate vs DPO",
            n_permutations, seed,
        )  # fmt: skip
    results["control_arms"] = arms
    if NORM_MATCHED_LR in arms:
        results["verdicts"]["method"]["at_matched_norm"] = _matched_norm_statement(
            arms[NORM_MATCHED_LR]
        )
    return plotted, results


def _matched_norm_statement(comp: dict[str, Any]) -> str:
    """The method claim with the norm taken away, from the ``norm_matched_lr`` arm."""
    sf, norm = comp["feature_sets"]["scale_free"], comp["feature_sets"]["norm_only"]
    if "accuracy" not in sf or "accuracy" not in norm:
        return "the norm-matched comparison could not run"
    norms = ", ".join(f"{k} {v:.2f}" for k, v in comp["median_total_fro_norm"].items())
    beats = sf["ci_low"] > norm["ci_high"]
    return (
        f"at matched norm (median ‖ΔW‖_F {norms}), SFT vs DPO: scale-free accuracy "
        f"{sf['accuracy']:.3f} (95% CI {sf['ci_low']:.2f}-{sf['ci_high']:.2f}) vs norm-only "
        f"{norm['accuracy']:.3f} (95% CI {norm['ci_low']:.2f}-{norm['ci_high']:.2f}): "
        + ("shape separates the methods" if beats else "no margin outside the CIs")
    )
