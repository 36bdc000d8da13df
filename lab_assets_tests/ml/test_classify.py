"""The classifier that reads method and task off adapters' spectra, on synthetic frames."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from lab_assets.ml.classify import (
    SelectKLogisticRegression,
    classify,
    feature_matrix,
    plot_report,
    report_to_dict,
    wilson_interval,
)
from lab_assets.ml.spectral import effective_rank


def _synthetic_frames(n_seeds=6, separation=1.0, seed=0):
    """Adapter frames whose spectra depend on the method ('a' steep, 'b' flat, 'c' mid)."""
    rng = np.random.default_rng(seed)
    frames, labels, groups = {}, {}, {}
    decay = {"a": 0.5, "b": 0.9, "c": 0.7}
    for s in range(n_seeds):
        for method, d in decay.items():
            for task in ("x", "y"):
                rows = []
                for layer in range(2):
                    for mtype in ("q_proj", "v_proj"):
                        rate = d**separation * np.exp(0.05 * rng.standard_normal())
                        svs = np.sort(rate ** np.arange(4) * np.exp(0.1 * rng.standard_normal(4)))[
                            ::-1
                        ]
                        fro = float(np.sqrt(np.sum(svs**2)))
                        rows.append(
                            {
                                "module": f"model.layers.{layer}.self_attn.{mtype}",
                                "singular_values": list(svs),
                                "fro_norm": fro,
                                "spectral_norm": float(svs[0]),
                                "stable_rank": fro**2 / svs[0] ** 2,
                                "effective_rank": effective_rank(svs),
                                "subspace_overlap": math.nan,
                            }
                        )
                key = f"{method}-{task}-s{s}"
                frames[key] = pd.DataFrame(rows)
                labels[key] = method
                groups[key] = s
    return frames, pd.Series(labels), pd.Series(groups)


def test_feature_matrix_layout():
    frames, _, _ = _synthetic_frames(n_seeds=1)
    X = feature_matrix(frames)
    assert X.shape[0] == 6
    assert "q_proj.L0.sv1_norm" in X.columns and "v_proj.mean.stable_rank" in X.columns
    assert X["q_proj.L1.subspace_overlap"].isna().all()
    assert X["q_proj.L0.sv1_norm"].between(0, 1).all()


def test_classify_separable_and_shuffled(tmp_path):
    frames, y, groups = _synthetic_frames()
    X = feature_matrix(frames)
    report = classify(X, y, groups, n_permutations=100, seed=0)
    assert report.accuracy >= 0.9
    assert report.p_value < 0.05
    assert report.chance == pytest.approx(1 / 3)
    assert report.ci_low < report.accuracy < report.ci_high or report.accuracy == 1.0
    assert np.sum(report.confusion) == len(X) and report.labels == ["a", "b", "c"]
    assert report.top_features and report.n_groups == 6
    json.dumps(report_to_dict(report))

    shuffled = pd.Series(np.random.default_rng(1).permutation(y.to_numpy()), index=y.index)
    null = classify(X, shuffled, groups, n_permutations=100, seed=0)
    assert null.accuracy < 0.6
    assert null.p_value > 0.05

    plot_report({"method": report, "shuffled": null}, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_select_k_logistic_regression_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 6))
    y = np.array(["p", "q", "r", "s"])[rng.integers(0, 4, 40)]
    X[:, 0] += (y == "p") * 2
    ours = SelectKLogisticRegression(k=6, C=0.5).fit(X, y)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(X, y)
    assert np.allclose(ours.coef_, ref.coef_, atol=1e-5)
    assert np.allclose(ours.intercept_ - ours.intercept_.mean(), ref.intercept_, atol=1e-5)
    assert (ours.predict(X) == ref.predict(X)).all()


def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
