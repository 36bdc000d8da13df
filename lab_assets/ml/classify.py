"""Can the fine-tuning method (or the task) be read off an adapter's spectra?

This is the experiment's final question. ``feature_matrix`` turns per-module
spectral frames (``spectral.adapter_spectrum``) into one row per adapter, and
``classify`` answers with grouped cross-validation, so that adapters trained
from the same seed never sit on both sides of a split, against chance and a
permutation test.

Statistics worth knowing when reading a report:

* Label-free preprocessing (median imputation of missing features, dropping
  constant columns, standardising) is fitted once on all adapters: it never sees
  a label, so it cannot leak one. Everything that does see labels (univariate
  feature selection and the classifier) is fitted inside each training fold.
* ``permutation_test_score`` with ``groups`` permutes labels *within* each group
  (sklearn's documented behaviour). With seeds as groups that is the right null
  for a design where each seed covers every label; if a group holds only one
  label, permutations cannot move it and the p-value is conservative.
* When the forest is included, the better model is picked by the same CV that
  reports its accuracy, a small optimistic bias (two candidates).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

N_TOP_SINGULAR = 4
MAX_SELECTED_FEATURES = 32
_SCALAR_FEATURES = (
    "stable_rank",
    "effective_rank",
    "subspace_overlap",
    "subspace_overlap_right",
    "intruder_dims",
    "intruder_dims_right",
    "top_sv_shift",
)


def _module_type_and_layer(name: str) -> tuple[str, str | None]:
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    return parts[-1], (f"L{layer}" if layer is not None else None)


def _log10(x: Any) -> float:
    x = float(x) if x is not None else math.nan
    return math.log10(x) if x > 0 else math.nan


def _module_row_features(row: pd.Series) -> dict[str, float]:
    svs = row.get("singular_values")
    svs = np.asarray(svs if svs is not None else [], dtype=np.float64)
    fro = float(np.sqrt(np.sum(svs**2))) if svs.size else math.nan
    feats: dict[str, float] = {}
    for i in range(N_TOP_SINGULAR):
        feats[f"sv{i + 1}_norm"] = svs[i] / fro if i < svs.size and fro > 0 else math.nan
    feats["log_fro_norm"] = _log10(row.get("fro_norm", fro))
    feats["log_spectral_norm"] = _log10(row.get("spectral_norm", svs[0] if svs.size else None))
    for name in _SCALAR_FEATURES:
        value = row.get(name)
        feats[name] = float(value) if value is not None and pd.notna(value) else math.nan
    return feats


def feature_matrix(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per adapter (index = adapter id), spectral features per module type and layer.

    Columns are ``<type>.L<layer>.<feature>`` (e.g. ``q_proj.L0.sv1_norm``) plus
    the layer mean per type, ``<type>.mean.<feature>``. Features: top singular
    values over the Frobenius norm (``sv1_norm``…), ``stable_rank``,
    ``effective_rank``, ``log_fro_norm``, ``log_spectral_norm`` (log10) and, where
    the frame has them, ``subspace_overlap(_right)``, ``intruder_dims(_right)``
    and ``top_sv_shift``. Modules or columns missing from an adapter give NaN.
    """
    rows: dict[str, dict[str, float]] = {}
    for adapter_id, frame in frames.items():
        per_key: dict[str, float] = {}
        per_type: dict[str, dict[str, list[float]]] = {}
        for _, row in frame.iterrows():
            mtype, layer = _module_type_and_layer(str(row["module"]))
            feats = _module_row_features(row)
            for fname, value in feats.items():
                per_key[f"{mtype}.{layer or 'all'}.{fname}"] = value
                per_type.setdefault(mtype, {}).setdefault(fname, []).append(value)
        for mtype, feats_by_name in per_type.items():
            for fname, values in feats_by_name.items():
                finite = [v for v in values if not math.isnan(v)]
                per_key[f"{mtype}.mean.{fname}"] = float(np.mean(finite)) if finite else math.nan
        rows[str(adapter_id)] = per_key
    X = pd.DataFrame.from_dict(rows, orient="index")
    return X.reindex(columns=sorted(X.columns)).astype(np.float64)


@dataclass
class ClassificationReport:
    """Outcome of ``classify``; ``report_to_dict`` makes it JSON."""

    model: str
    cv: str
    n_samples: int
    n_features: int
    n_groups: int
    accuracy: float
    ci_low: float
    ci_high: float
    chance: float
    p_value: float
    n_permutations: int
    labels: list[str]
    confusion: list[list[int]]
    top_features: list[tuple[str, float]]
    importance_method: str
    cv_accuracy_by_model: dict[str, float] = field(default_factory=dict)
    permutation_scores_mean: float = math.nan


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return max(0.0, centre - half), min(1.0, centre + half)


def _preprocess(X: pd.DataFrame) -> pd.DataFrame:
    """Label-free: median-impute, drop all-missing and constant columns, standardise."""
    values = X.to_numpy(dtype=np.float64, copy=True)
    keep = ~np.all(np.isnan(values), axis=0)
    values = values[:, keep]
    medians = np.nanmedian(values, axis=0)
    missing = np.isnan(values)
    values[missing] = np.take(medians, np.nonzero(missing)[1])
    std = values.std(axis=0)
    informative = std > 1e-12 * np.maximum(1.0, np.abs(values).max(axis=0))
    values = (values[:, informative] - values[:, informative].mean(axis=0)) / std[informative]
    return pd.DataFrame(values, index=X.index, columns=X.columns[keep][informative])


def _f_scores(X: np.ndarray, y_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """ANOVA F statistic per column (as ``sklearn.feature_selection.f_classif``), NaN → 0."""
    n = X.shape[0]
    onehot = np.eye(n_classes)[y_idx]
    counts = onehot.sum(axis=0)
    sums = onehot.T @ X
    present = counts > 0
    means = sums[present] / counts[present, None]
    grand = X.mean(axis=0)
    between = (counts[present, None] * (means - grand) ** 2).sum(axis=0)
    within = ((X - (sums / np.maximum(counts, 1)[:, None])[y_idx]) ** 2).sum(axis=0)
    k = int(present.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (between / max(k - 1, 1)) / (within / max(n - k, 1))
    return np.nan_to_num(f, nan=0.0, posinf=np.finfo(np.float64).max)


class SelectKLogisticRegression:
    """Top-k ANOVA-F feature selection, then multinomial L2 logistic regression.

    Same objective as ``sklearn.linear_model.LogisticRegression`` for three or
    more classes (``C · Σ log-loss + ½‖W‖²``, intercept unpenalised; two classes
    use the same two-logit softmax), solved by Newton's method in numpy. It
    exists because ``permutation_test_score`` refits the model
    ``n_permutations × n_folds`` times (1000 by default) and sklearn's per-fit
    overhead made that take tens of seconds on two cores; this fit takes a few
    milliseconds. Implements the small part of the sklearn estimator API that
    ``cross_val_predict`` and ``permutation_test_score`` use.
    """

    def __init__(self, k: int = MAX_SELECTED_FEATURES, C: float = 0.1, max_iter: int = 100):
        self.k = k
        self.C = C
        self.max_iter = max_iter

    # -- sklearn estimator protocol
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"k": self.k, "C": self.C, "max_iter": self.max_iter}

    def set_params(self, **params: Any) -> SelectKLogisticRegression:
        for key, value in params.items():
            setattr(self, key, value)
        return self

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier",
            target_tags=TargetTags(required=True),
            classifier_tags=ClassifierTags(),
        )

    def fit(self, X: np.ndarray, y: np.ndarray) -> SelectKLogisticRegression:
        X = np.asarray(X, dtype=np.float64)
        self.classes_, y_idx = np.unique(np.asarray(y), return_inverse=True)
        n_classes = len(self.classes_)
        scores = _f_scores(X, y_idx, n_classes)
        self.support_ = np.sort(np.argsort(-scores, kind="stable")[: min(self.k, X.shape[1])])
        Xs = np.hstack([X[:, self.support_], np.ones((X.shape[0], 1))])
        n, d = Xs.shape
        Y = np.eye(n_classes)[y_idx]
        reg = np.ones(d)
        reg[-1] = 0.0  # intercept unpenalised
        theta = np.zeros((d, n_classes))

        def objective(t: np.ndarray) -> float:
            z = Xs @ t
            zmax = z.max(axis=1, keepdims=True)
            lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
            return float(
                self.C * np.sum(lse - (z * Y).sum(axis=1)) + 0.5 * np.sum(reg[:, None] * t**2)
            )

        f = objective(theta)
        for _ in range(self.max_iter):
            z = Xs @ theta
            P = np.exp(z - z.max(axis=1, keepdims=True))
            P /= P.sum(axis=1, keepdims=True)
            grad = self.C * Xs.T @ (P - Y) + reg[:, None] * theta
            if np.abs(grad).max() < 1e-9:
                break
            # Hessian of the softmax log-loss, ordered (feature, class)
            D = P[:, :, None] * (np.eye(n_classes)[None] - P[:, None, :])
            XD = (Xs[:, :, None, None] * D[:, None, :, :]).reshape(n, -1)  # (i, l·k·m)
            H = (Xs.T @ XD).reshape(d, d, n_classes, n_classes).transpose(0, 2, 1, 3)
            H = self.C * H.reshape(d * n_classes, d * n_classes)
            H += np.diag(np.repeat(reg, n_classes)) + 1e-10 * np.eye(d * n_classes)
            step = np.linalg.solve(H, grad.reshape(-1)).reshape(d, n_classes)
            t, decrease = 1.0, float(np.sum(grad * step))
            while t > 1e-8:  # backtracking (Armijo)
                candidate = theta - t * step
                f_new = objective(candidate)
                if f_new <= f - 1e-4 * t * decrease:
                    break
                t *= 0.5
            else:
                break  # no descent left: at the optimum to rounding
            theta, f = candidate, f_new
        self.coef_ = theta[:-1].T  # n_classes × k
        self.intercept_ = theta[-1]
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return X[:, self.support_] @ self.coef_.T + self.intercept_

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(X) == np.asarray(y)))


def _make_model(kind: str, n_features: int, seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.feature_selection import SelectKBest, f_classif
    from sklearn.pipeline import Pipeline

    k = min(MAX_SELECTED_FEATURES, n_features)
    if kind == "logistic_regression":
        return SelectKLogisticRegression(k=k, C=0.1)
    if kind == "random_forest":
        return Pipeline(
            [
                ("select", SelectKBest(f_classif, k=k)),
                ("clf", RandomForestClassifier(n_estimators=100, random_state=seed)),
            ]
        )
    raise ValueError(f"unknown model {kind!r}")


def _aligned_targets(
    X: pd.DataFrame, y: pd.Series, groups: pd.Series
) -> tuple[pd.Series, pd.Series, list[str], int]:
    """``y`` and ``groups`` indexed like ``X``, the sorted labels and the number of groups."""
    y = pd.Series(y).reindex(X.index) if isinstance(y, pd.Series) else pd.Series(y, X.index)
    groups = (
        pd.Series(groups).reindex(X.index)
        if isinstance(groups, pd.Series)
        else pd.Series(groups, X.index)
    )
    if y.isna().any() or groups.isna().any():
        raise ValueError("y and groups must cover every row of X")
    labels = sorted(y.astype(str).unique())
    if len(labels) < 2:
        raise ValueError(f"need at least two classes, got {labels}")
    n_groups = int(groups.nunique())
    if n_groups < 2:
        raise ValueError("need at least two groups for grouped cross-validation")
    return y, groups, labels, n_groups


def _grouped_cv(n_groups: int) -> tuple[Any, str]:
    """``GroupKFold`` with ``min(5, n_groups)`` folds, and its name in the report."""
    from sklearn.model_selection import GroupKFold

    n_splits = min(5, n_groups)
    name = (
        f"LeaveOneGroupOut ({n_groups} groups)"
        if n_splits == n_groups
        else f"GroupKFold({n_splits}) over {n_groups} groups"
    )
    return GroupKFold(n_splits=n_splits), name


@dataclass
class _Fit:
    best: str
    predictions: dict[str, np.ndarray]
    cv_accuracy: dict[str, float]
    permutation_scores: np.ndarray
    p_value: float
    final: Any


def _fit_and_test(
    Xa: np.ndarray,
    ya: np.ndarray,
    ga: np.ndarray,
    cv: Any,
    kinds: list[str],
    n_permutations: int,
    seed: int,
) -> _Fit:
    """Out-of-fold predictions per model kind, the best one's permutation test and final fit."""
    from sklearn.model_selection import cross_val_predict, permutation_test_score
    from threadpoolctl import threadpool_limits

    # Many tiny fits: BLAS/OpenMP threads only add contention here.
    with threadpool_limits(1):
        preds: dict[str, np.ndarray] = {}
        cv_acc: dict[str, float] = {}
        for kind in kinds:
            model = _make_model(kind, Xa.shape[1], seed)
            preds[kind] = cross_val_predict(model, Xa, ya, groups=ga, cv=cv)
            cv_acc[kind] = float(np.mean(preds[kind] == ya))
        best = max(kinds, key=lambda k: (cv_acc[k], k == "logistic_regression"))
        model = _make_model(best, Xa.shape[1], seed)
        _, perm_scores, p_value = permutation_test_score(
            model,
            Xa,
            ya,
            groups=ga,
            cv=cv,
            n_permutations=n_permutations,
            random_state=seed,
            scoring=None,  # the estimator's own accuracy: cheaper than a scorer
        )
        final = _make_model(best, Xa.shape[1], seed).fit(Xa, ya)
    return _Fit(best, preds, cv_acc, perm_scores, p_value, final)


def _top_features(best: str, final: Any, columns: np.ndarray) -> tuple[list, str]:
    """The ten most important features of the final model, and how importance was measured."""
    if best == "logistic_regression":
        names = columns[final.support_]
        importance = np.abs(final.coef_).mean(axis=0)
        method = "mean |coef| of the standardised logistic regression (all data)"
    else:
        names = columns[final.named_steps["select"].get_support()]
        importance = final.named_steps["clf"].feature_importances_
        method = "random-forest impurity importance (all data)"
    order = np.argsort(importance)[::-1][:10]
    return [(str(names[i]), float(importance[i])) for i in order], method


def classify(
    X: pd.DataFrame,
    y: pd.Series,
    groups: pd.Series,
    n_permutations: int = 200,
    seed: int = 0,
    *,
    include_forest: bool = False,
) -> ClassificationReport:
    """Grouped-CV classification of ``y`` from ``X`` with accuracy, CI, chance and p-value.

    ``GroupKFold`` with ``min(5, n_groups)`` folds (leave-one-group-out when there
    are at most 5 groups). The model is a logistic regression (L2, C=0.1) on the
    ``MAX_SELECTED_FEATURES`` best univariate features of standardised inputs;
    ``include_forest=True`` also tries a random forest and keeps the better by CV
    accuracy (its permutation test is then much slower: about a minute).
    Accuracy pools the out-of-fold predictions; the Wilson 95% CI is over those
    ``n_samples`` predictions; chance is the majority-class rate; the p-value is
    from ``permutation_test_score`` with the same groups and folds.
    """
    from sklearn.metrics import confusion_matrix

    y, groups, labels, n_groups = _aligned_targets(X, y, groups)
    Xp = _preprocess(X)
    if Xp.shape[1] == 0:
        raise ValueError("no informative (non-constant, non-missing) features")
    Xa = Xp.to_numpy()
    ya = y.astype(str).to_numpy()
    ga = groups.to_numpy()
    cv, cv_name = _grouped_cv(n_groups)
    kinds = ["logistic_regression"] + (["random_forest"] if include_forest else [])
    fit = _fit_and_test(Xa, ya, ga, cv, kinds, n_permutations, seed)
    best, preds, cv_acc = fit.best, fit.predictions, fit.cv_accuracy

    correct = int(np.sum(preds[best] == ya))
    ci_low, ci_high = wilson_interval(correct, len(ya))
    chance = float(pd.Series(ya).value_counts(normalize=True).max())
    cm = confusion_matrix(ya, preds[best], labels=labels)
    top, method = _top_features(best, fit.final, np.asarray(Xp.columns))
    perm_scores, p_value = fit.permutation_scores, fit.p_value

    return ClassificationReport(
        model=best,
        cv=cv_name,
        n_samples=len(ya),
        n_features=int(Xp.shape[1]),
        n_groups=n_groups,
        accuracy=correct / len(ya),
        ci_low=ci_low,
        ci_high=ci_high,
        chance=chance,
        p_value=float(p_value),
        n_permutations=int(n_permutations),
        labels=labels,
        confusion=cm.astype(int).tolist(),
        top_features=top,
        importance_method=method,
        cv_accuracy_by_model=cv_acc,
        permutation_scores_mean=float(np.mean(perm_scores)),
    )


def report_to_dict(report: ClassificationReport) -> dict[str, Any]:
    """JSON-serialisable form (tuples become lists, NaN becomes None)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return None if math.isnan(value) else value
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return clean(value.item())
        return value

    return clean(asdict(report))


def _title(name: str, r: ClassificationReport) -> str:
    return (
        f"{name} ({r.model.replace('_', ' ')})\n"
        f"acc {r.accuracy:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] vs chance {r.chance:.2f}, "
        f"p={r.p_value:.3g}"
    )


def plot_report(reports: dict[str, ClassificationReport], path: str | Path) -> None:
    """Confusion matrices side by side, accuracy with 95% CI vs chance in each title (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(reports))
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], reports.items(), strict=False):
        cm = np.asarray(r.confusion)
        ax.imshow(cm, cmap="Blues", vmin=0)
        ax.set_xticks(range(len(r.labels)), r.labels, rotation=30, ha="right")
        ax.set_yticks(range(len(r.labels)), r.labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        threshold = cm.max() / 2 if cm.size else 0
        for (i, j), count in np.ndenumerate(cm):
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                color="white" if count > threshold else "black",
            )
        ax.set_title(_title(name, r), fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
