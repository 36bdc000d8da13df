"""The shipped 3B GCE experiment validates and dry-runs on a machine with no credentials and
no variables set; values from the environment (``${NAME}``, ``${NAME:-default}``) and their
placeholders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lab_assets.cli.main import main
from lab_assets.experiment.load import load_experiment, parse_experiment
from lab_assets.experiment.schema import ExperimentError

REPO = Path(__file__).resolve().parents[2]
QWEN = REPO / "experiments" / "qwen2.5-3b-lora.yaml"
PARTITION = "qwen2.5-3b|sft-arith-r16-s0"


@pytest.fixture
def bare_machine(monkeypatch, tmp_path):
    """No credentials, none of the lab's variables, and endpoints that refuse connections:
    any Compute Engine or GCS call would fail the command."""
    for name in ("LAB_GCP_PROJECT", "LAB_GCS_BUCKET", "LAB_STORAGE_ROOT", "LAB_EXPERIMENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    monkeypatch.setenv("LAB_GCE_API_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    return tmp_path


def test_the_3b_experiment_validates_with_no_credentials_and_no_variables(bare_machine, capsys):
    assert main(["validate", "--experiment", str(QWEN)]) == 0
    out = capsys.readouterr().out
    assert "base models  qwen2.5-3b" in out
    assert re.search(r"runs\s+30: sft-arith-r16-s0, ", out)
    assert "adapters     30 partitions" in out
    assert "not probed: set LAB_GCS_BUCKET, LAB_GCP_PROJECT first" in out
    exp = load_experiment(QWEN)
    c = exp.file.compute
    assert exp.placeholders == ("LAB_GCS_BUCKET", "LAB_GCP_PROJECT")
    assert c.project == "your-gcp-project" and exp.storage_root == "gs://your-lab-bucket/lab"
    hub = exp.file.base_models[0].source
    assert hub.repo_id == "Qwen/Qwen2.5-3B" and re.fullmatch(r"[0-9a-f]{40}", hub.revision)
    assert c.spot and c.fallback_gpu_types == ["nvidia-tesla-a100"] and not c.hourly_usd
    assert exp.file.budget.max_usd > 0


def test_the_3b_experiment_dry_runs_with_catalog_prices(bare_machine, capsys):
    body = bare_machine / "body.json"
    argv = ["launch", "--experiment", str(QWEN), "--asset", "adapter", "--partition", PARTITION]
    assert main([*argv, "--dry-run", "--body-out", str(body)]) == 0
    out = capsys.readouterr().out
    rows = [
        ln.split() for ln in out.splitlines() if re.match(r"\s+\d+\s+[a-z]+-[a-z]+\d-[a-z]", ln)
    ]
    # every L4 candidate first, the A100 fallback after, each priced from the catalog
    assert rows[0][1:4] == ["us-central1-a", "g2-standard-8", "1"] and rows[0][5] == "nvidia-l4"
    assert rows[-1][2] == "a2-highgpu-1g" and rows[-1][5] == "nvidia-tesla-a100"
    gpus = [r[5] for r in rows]
    assert gpus == sorted(gpus, key=lambda g: g != "nvidia-l4")
    for r in rows:
        price, worst = float(r[6]), float(r[7])
        assert price > 0 and worst == pytest.approx(price * 4, abs=0.01)  # 4 h maxRunDuration
    assert float(rows[0][6]) == pytest.approx(0.11747 + 0.2231, abs=1e-3)  # spot g2-standard-8
    assert "budget $75.00: the first choice's worst case $1.36 fits" in out
    assert "vendored 2026-11-25" in out and "placeholders in use" in out
    assert '"machineType": "zones/us-central1-a/machineTypes/g2-standard-8"' in body.read_text()
    # a real launch (or anything that talks to GCP) refuses, naming what to set
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "LAB_GCP_PROJECT" in err and "LAB_GCS_BUCKET" in err and "export" in err


def test_values_from_the_environment(monkeypatch, tmp_path):
    path = tmp_path / "exp.yaml"
    text = QWEN.read_text()
    monkeypatch.setenv("LAB_GCP_PROJECT", "my-lab-project")
    monkeypatch.setenv("LAB_GCS_BUCKET", "my-lab-bucket")
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    exp = parse_experiment(text, path)
    assert exp.placeholders == ()
    assert exp.file.compute.project == "my-lab-project"
    assert exp.storage_root == "gs://my-lab-bucket/lab"
    # the text kept for a step elsewhere has the values in: a VM sees the same experiment
    assert "${" not in exp.text and "my-lab-project" in exp.text
    monkeypatch.delenv("LAB_NOT_SET", raising=False)
    with pytest.raises(ExperimentError, match=r"\$\{LAB_NOT_SET\}.*set LAB_NOT_SET"):
        parse_experiment(
            text.replace("${LAB_GCP_PROJECT:-your-gcp-project}", "${LAB_NOT_SET}"), path
        )
    literal = text.replace("description: >", "description: >\n  costs $${X} a day;")
    assert "costs ${X} a day" in parse_experiment(literal, path).file.description
