"""The experiment file: what loads, what is refused, and that errors name file and field."""

import subprocess
import sys
import textwrap

import pytest

from lab_assets.experiment.load import DEFAULT_EXPERIMENT, load_experiment
from lab_assets.experiment.schema import ExperimentError
from lab_assets_tests.conftest import SMALL_EXPERIMENT, TESTS_DIR

REPO_ROOT = TESTS_DIR.parent

VALID = textwrap.dedent(
    """
    name: t
    storage: ./store
    base_models:
      - id: m1
        source: {kind: tiny}
    grid:
      - methods: [lora_sft, dpo]
        tasks: [arith]
        seeds: [0]
    runs:
      - {method: dpo, task: reverse, seed: 3, rank: 4, learning_rate: 0.01}
    """
)


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_default_experiment_has_at_least_30_adapters_with_readable_keys(monkeypatch):
    monkeypatch.delenv("LAB_EXPERIMENT", raising=False)
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    exp = load_experiment()
    assert exp.path == REPO_ROOT / DEFAULT_EXPERIMENT
    assert len(exp.runs) * len(exp.model_ids) >= 30
    assert "dpo-arith-r8-s0" in exp.run_ids and "sft-sentiment-r8-s4" in exp.run_ids
    assert exp.model_ids == ["tiny-llama"]
    assert exp.storage_root == str(REPO_ROOT / "lab-storage")


def test_overrides_keys_and_storage(tmp_path, monkeypatch):
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    exp = load_experiment(write(tmp_path, VALID))
    assert exp.run_ids == ["sft-arith-r8-s0", "dpo-arith-r8-s0", "dpo-reverse-r4-s3"]
    explicit = exp.run("dpo-reverse-r4-s3")
    assert explicit.hyper.learning_rate == 0.01 and explicit.hyper.steps == 30
    assert exp.storage_root == str(tmp_path / "store")
    # keys are stable: loading again gives the same ids and fingerprints
    again = load_experiment(write(tmp_path, VALID))
    assert [r.fingerprint() for r in again.runs] == [r.fingerprint() for r in exp.runs]
    monkeypatch.setenv("LAB_STORAGE_ROOT", "gs://my-bucket/lab")
    assert load_experiment(write(tmp_path, VALID)).storage_root == "gs://my-bucket/lab"


def test_experiment_env_picks_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_EXPERIMENT", str(SMALL_EXPERIMENT))
    assert load_experiment().name == "small"


@pytest.mark.parametrize(
    "edit, field, says",
    [
        (
            ("methods: [lora_sft, dpo]", "methods: [lora_sft, ppo]"),
            "grid.0.methods.1",
            "'lora_sft' or 'dpo'",
        ),
        (("tasks: [arith]", "tasks: [poetry]"), "grid.0.tasks", "unknown task 'poetry'"),
        (
            ("seeds: [0]", "seeds: [0]\n    learning_rat: 0.1"),
            "grid.0.learning_rat",
            "unknown field",
        ),
        (("rank: 4,", "rank: four,"), "runs.0.rank", "valid integer"),
        (("name: t", "name: t\nbudget: {max_usd: -1}"), "budget.max_usd", "greater than or equal"),
        (
            ("source: {kind: tiny}", "source: {kind: hub, repo_id: a/b, revision: main}"),
            "base_models.0.source.hub.revision",
            "pin a commit sha",
        ),
        (
            ("source: {kind: tiny}", "source: {kind: tiny, hidden_size: 130}"),
            "base_models.0.source.tiny",
            "divisible by num_heads",
        ),
        (
            (
                "name: t",
                "name: t\ncompute: {kind: gce, project: my-proj, zones: [nowhere],"
                " machine_type: g2-standard-8, gpu_type: nvidia-l4}",
            ),
            "compute.gce.zones",
            "not a zone name",
        ),
    ],
)
def test_bad_input_names_file_and_field(tmp_path, edit, field, says):
    old, new = edit
    assert old in VALID
    p = write(tmp_path, VALID.replace(old, new))
    with pytest.raises(ExperimentError) as err:
        load_experiment(p)
    msg = str(err.value)
    assert f"{p}: {field}" in msg, msg
    assert says in msg, msg


def test_duplicate_run_id_names_both_origins(tmp_path):
    p = write(tmp_path, VALID + "  - {method: lora_sft, task: arith, seed: 0}\n")
    with pytest.raises(
        ExperimentError,
        match=r"runs\.1: duplicate run id 'sft-arith-r8-s0' \(also produced by grid\.0\)",
    ) as err:
        load_experiment(p)
    assert str(p) in str(err.value)
    # a tag makes it distinct
    ok = write(tmp_path, VALID + "  - {method: lora_sft, task: arith, seed: 0, tag: lr2}\n")
    assert "sft-arith-r8-s0-lr2" in load_experiment(ok).run_ids


def test_missing_file_and_bad_yaml(tmp_path, monkeypatch):
    with pytest.raises(ExperimentError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")
    monkeypatch.setenv("LAB_EXPERIMENT", str(tmp_path / "gone.yaml"))
    with pytest.raises(
        ExperimentError, match=r"gone\.yaml: experiment file not found \(from \$LAB_EXPERIMENT\)"
    ):
        load_experiment()
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load_experiment(write(tmp_path, "name: [unclosed"))
    with pytest.raises(ExperimentError, match="top level must be a mapping"):
        load_experiment(write(tmp_path, "- a\n- b\n"))


def test_invalid_file_stops_definitions_and_cli_before_anything_runs(tmp_path):
    bad = write(tmp_path, VALID.replace("tasks: [arith]", "tasks: [poetry]"))
    storage = tmp_path / "storage"
    env = {"LAB_EXPERIMENT": str(bad), "LAB_STORAGE_ROOT": str(storage), "PATH": "/usr/bin:/bin"}
    code = "from lab_assets.definitions import defs; defs()"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=TESTS_DIR.parent
    )
    assert proc.returncode != 0
    assert f"{bad}: grid.0.tasks: unknown task 'poetry'" in proc.stderr
    cli = subprocess.run(
        [sys.executable, "-m", "lab_assets.cli", "materialize"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert cli.returncode == 2
    assert f"lab: invalid experiment file\n  {bad}: grid.0.tasks" in cli.stderr
    assert not storage.exists()
    assert not (tmp_path / ".dagster_home").exists()
