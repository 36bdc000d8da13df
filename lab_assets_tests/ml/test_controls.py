"""The classification's controls: scale-free features, norm-only, norm-matched random ΔW,
control arms, and the p-value floor, on synthetic spectra."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from lab_assets.ml.classify import feature_matrix
from lab_assets.ml.controls import (
    NORM_FEATURE,
    NORM_MATCHED_LR,
    SHUFFLED_PREFERENCES,
    classify_with_controls,
    norm_only,
    random_delta_frames,
    scale_free_columns,
    total_fro_norm,
    verdict,
)
from lab_assets.ml.spectral import effective_rank


def _frame(svs_by_module: dict[str, np.ndarray], rank: int = 4) -> pd.DataFrame:
    rows = []
    for module, svs in svs_by_module.items():
        fro = float(np.sqrt(np.sum(svs**2)))
        rows.append(
            {
                "module": module,
                "singular_values": list(svs),
                "rank": rank,
                "out_features": 16,
                "in_features": 12,
                "fro_norm": fro,
                "spectral_norm": float(svs[0]),
                "stable_rank": fro**2 / svs[0] ** 2,
                "effective_rank": effective_rank(svs),
            }
        )
    return pd.DataFrame(rows)


MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj")


def _adapters(shape_differs: bool, norm_differs: bool, n_seeds: int = 5, arms=()):
    """Two methods x two tasks x seeds; method sets the norm and/or the spectral decay."""
    rng = np.random.default_rng(0)
    frames, labels = {}, {}
    plan = [("main", m) for m in ("lora_sft", "dpo")] + [(a, m) for a, m in arms]
    for arm, method in plan:
        for task in ("x", "y"):
            for s in range(n_seeds):
                decay = 0.3 if (shape_differs and method == "lora_sft") else 0.8
                if arm == NORM_MATCHED_LR:
                    decay = 0.3
                size = 10.0 if (norm_differs and method == "lora_sft" and arm == "main") else 1.0
                svs = {}
                for m in MODULES:
                    profile = decay ** np.arange(4) * np.exp(0.05 * rng.standard_normal(4))
                    # the norm is set apart from the shape: unit norm, then the size
                    profile /= np.sqrt(np.sum(profile**2))
                    svs[m] = size * np.exp(0.2 * rng.standard_normal()) * profile
                key = f"{method}-{task}-s{s}-{arm}"
                frames[key] = _frame({m: np.sort(v)[::-1] for m, v in svs.items()})
                labels[key] = {"method": method, "task": task, "group": f"s{s}", "arm": arm}
    return frames, pd.DataFrame.from_dict(labels, orient="index")


def test_scale_free_columns_do_not_change_when_delta_w_is_scaled():
    frames, _ = _adapters(True, False, n_seeds=1)
    X = feature_matrix(frames)
    scaled = {k: f.assign(
        singular_values=[list(np.asarray(s) * 7.0) for s in f["singular_values"]],
        fro_norm=f["fro_norm"] * 7.0,
        spectral_norm=f["spectral_norm"] * 7.0,
    ) for k, f in frames.items()}  # fmt: skip
    X7 = feature_matrix(scaled)
    sf, sf7 = scale_free_columns(X), scale_free_columns(X7)
    assert len(sf.columns) > 0 and not any("log" in c for c in sf.columns)
    pd.testing.assert_frame_equal(sf, sf7, rtol=1e-10)
    assert not np.allclose(X["q_proj.L0.log_fro_norm"], X7["q_proj.L0.log_fro_norm"])


def test_norm_only_is_one_scalar_the_total_frobenius_norm():
    frames, _ = _adapters(False, True, n_seeds=1)
    N = norm_only(frames)
    assert list(N.columns) == [NORM_FEATURE] and len(N) == len(frames)
    key = next(iter(frames))
    svs = np.concatenate([np.asarray(s) for s in frames[key]["singular_values"]])
    assert total_fro_norm(frames[key]) == pytest.approx(np.sqrt(np.sum(svs**2)))
    assert N.loc[key, NORM_FEATURE] == pytest.approx(math.log10(np.sqrt(np.sum(svs**2))))


def test_random_delta_keeps_norms_shapes_and_ranks_and_nothing_else():
    frames, _ = _adapters(True, False, n_seeds=1)
    rnd = random_delta_frames(frames, seed=1)
    assert rnd.keys() == frames.keys()
    for key, frame in frames.items():
        r = rnd[key]
        assert list(r["module"]) == list(frame["module"])
        assert np.allclose(r["fro_norm"], frame["fro_norm"])
        for svs, fro in zip(r["singular_values"], r["fro_norm"], strict=True):
            assert len(svs) == 4 and np.sqrt(np.sum(np.square(svs))) == pytest.approx(fro)
    assert random_delta_frames(frames, seed=1)[key].equals(rnd[key])  # seeded


def test_a_norm_effect_is_called_one_and_a_shape_effect_beats_the_controls():
    # method differs by norm only: norm-only and random ΔW classify it, scale-free cannot
    frames, labels = _adapters(shape_differs=False, norm_differs=True)
    _, res = classify_with_controls(frames, labels, n_permutations=20)
    sets = res["feature_sets"]["method"]
    assert sets["norm_only"]["accuracy"] == 1.0 and sets["random_delta"]["accuracy"] == 1.0
    assert sets["scale_free"]["accuracy"] < 0.8
    v = res["verdicts"]["method"]
    assert v["explained_by_norm"] and not v["beats_controls"]
    assert "explained by norm alone" in v["statement"]
    assert res["method"]["feature_set"] == "scale_free"

    # method differs by shape only: scale-free wins by a margin outside the CIs
    frames, labels = _adapters(shape_differs=True, norm_differs=False)
    plotted, res = classify_with_controls(frames, labels, n_permutations=20)
    v = res["verdicts"]["method"]
    assert res["method"]["accuracy"] == 1.0 and v["beats_controls"], v
    assert not v["explained_by_norm"]
    assert "method, scale-free features" in plotted
    json.dumps(res)


def test_p_value_floor_is_reported():
    frames, labels = _adapters(True, False)
    _, res = classify_with_controls(frames, labels, n_permutations=149)
    assert res["p_value_floor"] == pytest.approx(1 / 150) and res["p_value_floor"] < 0.01
    assert res["method"]["p_value"] >= res["p_value_floor"]
    assert res["n_permutations"] == 149


def test_control_arms_are_kept_out_of_the_headline_and_compared_beside_it():
    arms = [(SHUFFLED_PREFERENCES, "dpo"), (NORM_MATCHED_LR, "lora_sft")]
    frames, labels = _adapters(shape_differs=True, norm_differs=True, arms=arms)
    _, res = classify_with_controls(frames, labels, n_permutations=10)
    assert res["method"]["n_samples"] == 20  # main arm only
    shuf = res["control_arms"][SHUFFLED_PREFERENCES]
    assert shuf["n_adapters"] == 20
    assert set(shuf["feature_sets"]) == {"scale_free", "all", "norm_only"}
    assert "accuracy" in shuf["task_scale_free"]
    matched = res["control_arms"][NORM_MATCHED_LR]
    assert set(matched["median_total_fro_norm"]) == {"dpo", "lora_sft"}
    # norm-matched SFT differs from DPO in shape only: scale-free tells them apart
    assert matched["feature_sets"]["scale_free"]["accuracy"] == 1.0
    assert "shape separates the methods" in res["verdicts"]["method"]["at_matched_norm"]


def test_verdict_needs_the_scale_free_ci_above_both_controls():
    class R:
        def __init__(self, acc, lo, hi):
            self.accuracy, self.ci_low, self.ci_high = acc, lo, hi

    reports = {
        "scale_free": R(0.9, 0.75, 0.97),
        "norm_only": R(0.6, 0.45, 0.74),
        "random_delta": R(0.7, 0.55, 0.8),
        "all": R(0.95, 0.8, 0.99),
    }
    assert not verdict("task", reports).beats_controls  # 0.75 < random's 0.8
    reports["random_delta"] = R(0.6, 0.45, 0.74)
    v = verdict("task", reports)
    assert v.beats_controls and not v.explained_by_norm
    assert v.margin_over_norm == pytest.approx(0.3)
