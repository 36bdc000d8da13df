"""Several experiments in one Dagster UI (`workspace.all.yaml`), in headless Chromium.

Two experiment files sit in one folder: the session's materialised small experiment
and a second one (`small-b`, never run). With ``LAB_PREFIX_ASSET_KEYS=1``, `lab
reconcile` records the first one's stored partitions into a fresh instance under
prefixed keys (``small/adapter``), and `dagster-webserver` over `workspace.all.yaml`
serves both experiments: the catalog lists both key prefixes, the first experiment's
adapters show as materialised, the second's as missing. Loading the workspace without
the variable is refused with a message naming it, and so is a `lab sweep` without it
against an instance that holds the prefixed keys.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from dagster import AssetKey, DagsterInstance

from lab_assets_tests.conftest import SMALL_EXPERIMENT, TESTS_DIR
from lab_assets_tests.defs.test_ui_browser import CHROMIUM, CHROMIUM_ARGS, dagster_webserver


def _experiments(folder):
    folder.mkdir()
    text = SMALL_EXPERIMENT.read_text()
    (folder / "small.yaml").write_text(text)
    assert "name: small\n" in text
    (folder / "small-b.yaml").write_text(text.replace("name: small\n", "name: small-b\n"))


def test_two_experiments_side_by_side_in_one_ui(small_lab, tmp_path):
    from playwright.sync_api import sync_playwright

    exps = tmp_path / "experiments"
    _experiments(exps)
    home = tmp_path / "home"
    (home / ".nux").mkdir(parents=True)
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")  # no "join the community" dialog
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    storage = tmp_path / "storage"
    shutil.copytree(small_lab["root"] / "storage", storage)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "LAB_STORAGE_ROOT": str(storage),
        "LAB_SCRATCH_ROOT": str(tmp_path),
        "LAB_EXPERIMENTS_DIR": str(exps),
        "LAB_PREFIX_ASSET_KEYS": "1",
    }
    env.pop("LAB_EXPERIMENT", None)
    lab = [sys.executable, "-m", "lab_assets.cli", "reconcile", "--experiment"]
    done = subprocess.run(
        [*lab, str(exps / "small.yaml")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    os.environ["DAGSTER_HOME"], old = str(home), os.environ.get("DAGSTER_HOME")
    try:
        with DagsterInstance.get() as instance:
            keys = {k.to_user_string() for k in instance.all_asset_keys()}
            adapters = instance.get_materialized_partitions(AssetKey(["small", "adapter"]))
    finally:
        os.environ.pop("DAGSTER_HOME") if old is None else os.environ.update(DAGSTER_HOME=old)
    assert "small/adapter" in keys and "adapter" not in keys, keys
    assert len(adapters) == len(small_lab["exp"].runs)
    # A `lab` without the variable would see every partition missing: it refuses instead.
    plain = {k: v for k, v in env.items() if k != "LAB_PREFIX_ASSET_KEYS"}
    sweep = [sys.executable, "-m", "lab_assets.cli", "sweep", "--dry-run", "--experiment"]
    done = subprocess.run(
        [*sweep, str(exps / "small.yaml")], env=plain, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "export LAB_PREFIX_ASSET_KEYS=1" in done.stderr

    with (
        dagster_webserver(env, tmp_path / "webserver.log", "workspace.all.yaml") as url,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1200})
        page.set_default_timeout(120_000)  # a loaded 2-core machine renders slowly
        try:
            page.goto(f"{url}/assets")
            page.wait_for_selector("text=small_b")
            catalog = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "catalog.png"))
            assert "small" in catalog.split() and "small_b" in catalog.split(), catalog[:2000]

            n = len(small_lab["exp"].runs)
            page.goto(f"{url}/assets/small/adapter?view=partitions")
            page.wait_for_selector(f"text=Materialized ({n})")
            body = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "small_adapter.png"))
            assert "Missing (0)" in body and "sft-arith-r4-s0" in body, body[:3000]

            page.goto(f"{url}/assets/small_b/adapter?view=partitions")
            page.wait_for_selector(f"text=Missing ({n})")
            body = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "small_b_adapter.png"))
            assert "Materialized (0)" in body, body[:3000]
        finally:
            browser.close()


def test_the_shared_workspace_refuses_to_load_without_prefixed_keys(tmp_path):
    exps = tmp_path / "experiments"
    _experiments(exps)
    env = {**os.environ, "LAB_EXPERIMENTS_DIR": str(exps), "DAGSTER_HOME": str(tmp_path)}
    env.pop("LAB_PREFIX_ASSET_KEYS", None)
    done = subprocess.run(
        [sys.executable, "-c", "import lab_assets.all_experiments"],
        env=env,
        cwd=TESTS_DIR.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "LAB_PREFIX_ASSET_KEYS=1" in done.stderr.splitlines()[-1]
