"""Control arms in the experiment file: run ids, validation, and the headline's runs."""

from __future__ import annotations

import textwrap

import pytest

from lab_assets.experiment.load import load_experiment
from lab_assets.experiment.schema import ExperimentError

BASE = textwrap.dedent(
    """
    name: arms
    storage: ./store
    base_models:
      - id: m1
        source: {kind: tiny}
    grid:
      - methods: [lora_sft, dpo]
        tasks: [arith, reverse]
        seeds: [0, 1]
      - methods: [dpo]
        tasks: [arith]
        seeds: [0, 1]
        arm: shuffled_preferences
      - methods: [lora_sft]
        tasks: [arith]
        seeds: [0]
        arm: norm_matched_lr
        learning_rate: 0.0005
    runs:
      - {method: lora_sft, task: reverse, seed: 1, arm: norm_matched_lr, tag: low}
    """
)


def _load(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return load_experiment(p)


def test_arm_runs_get_readable_ids_and_their_own_fingerprints(tmp_path):
    exp = _load(tmp_path, BASE)
    assert "dpo-arith-r8-s0-shuf" in exp.run_ids and "dpo-arith-r8-s0" in exp.run_ids
    assert "sft-arith-r8-s0-normlr" in exp.run_ids
    assert "sft-reverse-r8-s1-low" in exp.run_ids  # a tag wins over the arm's slug
    shuf, real = exp.run("dpo-arith-r8-s0-shuf"), exp.run("dpo-arith-r8-s0")
    assert (shuf.arm, real.arm) == ("shuffled_preferences", "main")
    assert shuf.fingerprint() != real.fingerprint()
    assert exp.run("sft-arith-r8-s0-normlr").hyper.learning_rate == 0.0005
    assert len(exp.runs) == 8 + 2 + 1 + 1


@pytest.mark.parametrize(
    "old, new, says",
    [
        ("methods: [dpo]\n    tasks: [arith]\n    seeds: [0, 1]\n    arm: shuffled_preferences",
         "methods: [lora_sft]\n    tasks: [arith]\n    seeds: [0, 1]\n"
         "    arm: shuffled_preferences",
         r"grid.1: arm .shuffled_preferences.*methods must be \[dpo\]"),
        ("arm: norm_matched_lr, tag: low", "arm: placebo", r"runs.0.arm"),
    ],
)  # fmt: skip
def test_bad_arms_are_refused(tmp_path, old, new, says):
    with pytest.raises(ExperimentError, match=says):
        _load(tmp_path, BASE.replace(old, new))


def test_control_arms_do_not_count_for_the_headline_analysis(tmp_path):
    # the only lora_sft runs are a control arm: the headline has one method
    text = BASE.replace("methods: [lora_sft, dpo]", "methods: [dpo]")
    with pytest.raises(ExperimentError, match="classification of method needs at least two"):
        _load(tmp_path, text)


def test_default_experiment_has_both_control_arms(monkeypatch):
    from lab_assets_tests.conftest import TESTS_DIR

    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    exp = load_experiment(TESTS_DIR.parent / "experiments" / "tiny.yaml")
    arms = {r.arm for r in exp.runs}
    assert arms == {"main", "shuffled_preferences", "norm_matched_lr"}
    main = [r for r in exp.runs if r.arm == "main"]
    assert len(main) == 30 and {r.method for r in main} == {"lora_sft", "dpo"}
    assert exp.file.classification.n_permutations + 1 > 100  # p-value floor below 0.01
