"""`lab materialize`'s closing lines: the headline, its controls, the verdicts, the floor."""

from __future__ import annotations

from lab_assets.cli.runs import print_results
from lab_assets_tests.ml.test_controls import _adapters


def test_results_print_headline_controls_arms_and_the_p_value_floor(capsys):
    from lab_assets.ml.controls import NORM_MATCHED_LR, SHUFFLED_PREFERENCES, classify_with_controls

    arms = [(SHUFFLED_PREFERENCES, "dpo"), (NORM_MATCHED_LR, "lora_sft")]
    frames, labels = _adapters(shape_differs=True, norm_differs=True, arms=arms)
    _, results = classify_with_controls(frames, labels, n_permutations=9)
    print_results(results)
    out = capsys.readouterr().out
    assert "headline: scale_free features; p-value floor 0.1000 (9 permutations)" in out
    assert "  method  accuracy " in out and "  task    accuracy " in out
    for name in ("all", "norm_only", "random_delta"):
        assert f"control {name}" in out
    assert "explained by norm alone" in out  # norms differ by method here
    assert "at matched norm" in out
    assert "control arm shuffled_preferences" in out and "control arm norm_matched_lr" in out
    assert "task among them, scale-free" in out


def test_results_of_the_code_before_controls_still_print(capsys):
    old = {"method": {"accuracy": 1.0, "ci_low": 0.9, "ci_high": 1.0, "p_value": 0.005,
                      "chance": 0.5}}  # fmt: skip
    print_results(old)
    assert "method  accuracy 1.000" in capsys.readouterr().out
