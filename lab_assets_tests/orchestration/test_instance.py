"""The instance settings the engine needs are the same wherever a dagster.yaml comes from."""

import pytest
import yaml

from lab_assets.orchestration.instance import DAGSTER_YAML
from lab_assets_tests.fakes.fake_compute import REPO_ROOT

ENGINE_KEYS = ("run_queue", "concurrency", "run_launcher", "run_monitoring")


@pytest.mark.parametrize("name", ["dagster.gcs.example.yaml", "dagster.team.example.yaml"])
def test_the_examples_keep_the_lab_engine_settings(name):
    written = yaml.safe_load(DAGSTER_YAML)
    example = yaml.safe_load((REPO_ROOT / name).read_text())
    for key in ENGINE_KEYS:
        assert example.get(key) == written[key], key
    assert written["run_launcher"]["class"] == "WarmRunLauncher"
