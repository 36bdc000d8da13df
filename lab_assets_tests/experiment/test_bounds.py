"""Bounded inputs: every size has an upper bound, floats are finite, seeds are in range,
free text and lists are capped, and an experiment whose analysis cannot run is refused,
each with a message naming the file, the field and the bound, before anything runs."""

import textwrap
from pathlib import Path

import pytest

from lab_assets.cli.main import main
from lab_assets.experiment.load import load_experiment
from lab_assets.experiment.schema import ExperimentError
from lab_assets_tests.conftest import TESTS_DIR

REPO_ROOT = TESTS_DIR.parent

BASE = textwrap.dedent(
    """
    name: t
    description: bounds
    storage: ./store
    base_models:
      - id: m1
        source: {kind: tiny, vocab_size: 512, seed: 0}
    defaults: {steps: 30, n_examples: 256, learning_rate: 0.001}
    grid:
      - methods: [lora_sft, dpo]
        tasks: [arith, reverse]
        seeds: [0, 1, 2]
    runs:
      - {method: dpo, task: reverse, seed: 3, learning_rate: 0.01}
    """
)

GCE = (
    "compute: {kind: gce, project: my-proj, zones: [us-central1-a],"
    " machine_type: g2-standard-8, gpu_type: nvidia-l4, max_run_duration_s: 3600}\n"
)


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def edited(old: str, new: str, base: str = BASE) -> str:
    assert base.count(old) == 1, old
    return base.replace(old, new)


HOSTILE = {
    # id: ((old, new), field path, what the message must say)
    "steps 1e20": (("steps: 30", "steps: 1e20"), "defaults.steps", "less than or equal to 1000000"),
    "steps 1.0e+20": (
        ("steps: 30", "steps: 1.0e+20"),
        "defaults.steps",
        "less than or equal to 1000000",
    ),
    "steps 0": (("steps: 30", "steps: 0"), "defaults.steps", "greater than or equal to 1"),
    "n_examples 1e10": (
        ("n_examples: 256", "n_examples: 1e10"),
        "defaults.n_examples",
        "less than or equal to 10000000",
    ),
    "vocab_size 1e10": (
        ("vocab_size: 512", "vocab_size: 1e10"),
        "base_models.0.source.tiny.vocab_size",
        "less than or equal to 262144",
    ),
    "model seed 2**31": (
        ("seed: 0}", "seed: 2147483648}"),
        "base_models.0.source.tiny.seed",
        "less than or equal to 2147483647",
    ),
    "grid seed huge": (
        ("seeds: [0, 1, 2]", "seeds: [0, 1, 99999999999999999999999]"),
        "grid.0.seeds.2",
        "less than or equal to 2147483647",
    ),
    "grid seed -1": (
        ("seeds: [0, 1, 2]", "seeds: [0, -1, 2]"),
        "grid.0.seeds.1",
        "greater than or equal to 0",
    ),
    "run seed -1": (("seed: 3,", "seed: -1,"), "runs.0.seed", "greater than or equal to 0"),
    "description 5 MB": (
        ("description: bounds", "description: " + "x" * (5 << 20)),
        "description",
        "at most 10000 characters",
    ),
    "learning_rate inf": (
        ("learning_rate: 0.001", "learning_rate: .inf"),
        "defaults.learning_rate",
        "finite number",
    ),
    "learning_rate nan": (
        ("learning_rate: 0.001", "learning_rate: .nan"),
        "defaults.learning_rate",
        "finite number",
    ),
    "learning_rate 1e3": (
        ("learning_rate: 0.001", "learning_rate: 1e3"),
        "defaults.learning_rate",
        "less than or equal to 10",
    ),
    "run learning_rate -inf": (
        ("learning_rate: 0.01}", "learning_rate: -.inf}"),
        "runs.0.learning_rate",
        "finite number",
    ),
    "too many seeds": (
        ("seeds: [0, 1, 2]", f"seeds: {list(range(1001))}"),
        "grid.0.seeds",
        "at most 1000 items",
    ),
    "too many target modules": (
        ("steps: 30,", f"steps: 30, target_modules: {[f'm{i}' for i in range(65)]},"),
        "defaults.target_modules",
        "at most 64 items",
    ),
    "top_k 1e20": (
        ("name: t", "name: t\nspectrum: {top_k: 1e20}"),
        "spectrum.top_k",
        "less than or equal to 4096",
    ),
    "base_k 1e20": (
        ("name: t", "name: t\nspectrum: {base_k: 1e20}"),
        "spectrum.base_k",
        "less than or equal to 65536",
    ),
    "intruder_k 1e20": (
        ("name: t", "name: t\nspectrum: {intruder_k: 1e20}"),
        "spectrum.intruder_k",
        "less than or equal to 4096",
    ),
    "intruder_k 0": (
        ("name: t", "name: t\nspectrum: {intruder_k: 0}"),
        "spectrum.intruder_k",
        "greater than or equal to 1",
    ),
    "n_permutations 1e20": (
        ("name: t", "name: t\nclassification: {n_permutations: 1e20}"),
        "classification.n_permutations",
        "less than or equal to 10000",
    ),
    "max_usd inf": (("name: t", "name: t\nbudget: {max_usd: .inf}"), "budget.max_usd", "finite"),
    "max_gpu_in_flight 1e20": (
        ("name: t", "name: t\nsweep: {max_gpu_in_flight: 1e20}"),
        "sweep.max_gpu_in_flight",
        "less than or equal to 1000",
    ),
    "gce max_run_duration_s": (
        ("name: t", "name: t\n" + GCE.replace("3600", "99999999999")),
        "compute.gce.max_run_duration_s",
        "less than or equal to 2592000",
    ),
    "gce heartbeat nan": (
        ("name: t", "name: t\n" + GCE.replace("}", ", heartbeat_s: .nan}")),
        "compute.gce.heartbeat_s",
        "finite number",
    ),
    "gce price inf": (
        ("name: t", "name: t\n" + GCE.replace("}", ", hourly_usd: {g2-standard-8: .inf}}")),
        "compute.gce.hourly_usd",
        "not a finite number from 0 to",
    ),
}


@pytest.mark.parametrize("edit, field, bound", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_values_are_refused_naming_file_field_and_bound(tmp_path, edit, field, bound):
    p = write(tmp_path, edited(*edit))
    with pytest.raises(ExperimentError) as err:
        load_experiment(p)
    msg = str(err.value)
    assert f"{p}: {field}: " in msg, msg[:2000]
    assert bound in msg, msg[:2000]
    assert len(msg) < 2000  # the offending value is not echoed back


def test_lab_validate_prints_file_field_and_bound(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAB_STORAGE_ROOT", str(tmp_path / "storage"))
    p = write(tmp_path, edited("steps: 30", "steps: 1e20"))
    assert main(["validate", "--experiment", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"lab: invalid experiment file\n  {p}: defaults.steps: " in err
    assert "less than or equal to 1000000" in err
    assert not (tmp_path / "storage").exists()  # refused before the storage preflight


def test_the_bounds_still_admit_the_base_file(tmp_path):
    exp = load_experiment(write(tmp_path, BASE))
    assert len(exp.runs) == 13


def test_too_many_adapters_in_all(tmp_path):
    entry = (
        "  - {methods: [lora_sft, dpo], tasks: [arith, reverse, sentiment], seeds: %s, tag: %s}\n"
    )
    seeds = list(range(1000))  # the most one entry may have: 6000 runs each
    text = edited("grid:\n", "grid:\n" + entry % (seeds, "a") + entry % (seeds, "b"))
    with pytest.raises(ExperimentError, match=r"12013 adapters; at most 10000 ") as err:
        load_experiment(write(tmp_path, text))
    assert str(tmp_path / "exp.yaml") in str(err.value)


# -- the analysis must be able to run -------------------------------------------------

SINGLE_SEED = textwrap.dedent(
    """
    name: t
    storage: ./store
    base_models:
      - id: m1
        source: {kind: tiny}
    grid:
      - methods: [lora_sft, dpo]
        tasks: [arith, reverse]
        seeds: [0]
    """
)


def test_a_single_seed_is_refused_at_validation(tmp_path, monkeypatch, capsys):
    storage = tmp_path / "storage"
    monkeypatch.setenv("LAB_STORAGE_ROOT", str(storage))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    p = write(tmp_path, SINGLE_SEED)
    with pytest.raises(ExperimentError) as err:
        load_experiment(p)
    msg = str(err.value)
    assert f"{p}: seeds: the classification needs at least two seed groups" in msg, msg
    assert "holds out one group (base model/seed) at a time; got 1 (m1/s0, seed 0)" in msg, msg
    # `lab validate` and `lab materialize` say so, before anything is created or run
    for cmd in ("validate", "materialize"):
        assert main([cmd, "--experiment", str(p)]) == 2
        assert "at least two seed groups" in capsys.readouterr().err
    assert not storage.exists() and not (tmp_path / "home").exists()


def test_a_single_seed_over_two_base_models_makes_two_groups(tmp_path):
    text = edited(
        "    source: {kind: tiny}\n",
        "    source: {kind: tiny}\n  - id: m2\n    source: {kind: tiny, seed: 1}\n",
        SINGLE_SEED,
    )
    exp = load_experiment(write(tmp_path, text))
    assert exp.model_ids == ["m1", "m2"] and {r.seed for r in exp.runs} == {0}


@pytest.mark.parametrize(
    "edit, says",
    [
        (("methods: [lora_sft, dpo]", "methods: [dpo]"), "methods: the classification of method"),
        (("tasks: [arith, reverse]", "tasks: [arith]"), "tasks: the classification of task"),
    ],
    ids=["one method", "one task"],
)
def test_a_single_class_is_refused_at_validation(tmp_path, edit, says):
    p = write(tmp_path, edited(*edit, SINGLE_SEED.replace("seeds: [0]", "seeds: [0, 1]")))
    with pytest.raises(ExperimentError) as err:
        load_experiment(p)
    assert f"{p}: {says} needs at least two" in str(err.value)
    assert "got 1 (" in str(err.value)


EXPERIMENTS = sorted(
    [*REPO_ROOT.glob("experiments/*.yaml"), *REPO_ROOT.glob("lab_assets_tests/experiments/*.yaml")]
)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_and_test_experiment_is_still_valid(path, monkeypatch):
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    exp = load_experiment(path)
    assert exp.runs
    assert REPO_ROOT / "experiments" / "tiny.yaml" in EXPERIMENTS


def test_a_boolean_is_not_a_count(tmp_path):
    """YAML `steps: true` would pass as 1 through pydantic's lax int: refused."""
    p = write(tmp_path, edited("steps: 30", "steps: true"))
    with pytest.raises(ExperimentError) as err:
        load_experiment(p)
    assert f"{p}: defaults.steps: Input should be a valid integer" in str(err.value)
