"""What a researcher reads in the UI after `lab materialize`, in headless Chromium.

A copy of the session's materialised small experiment (its instance and storage) is
served by `dagster-webserver`; the adapter partition page must show the typed
hyper-parameters, the per-method loss figures and the stored loss-curve plot, and the
classification page the one-line headline. Screenshots land in the test's tmp dir.
"""

from __future__ import annotations

import os
import shutil

from lab_assets_tests.conftest import SMALL_EXPERIMENT
from lab_assets_tests.defs.test_ui_browser import CHROMIUM, CHROMIUM_ARGS, dagster_webserver

PARTITION = "tiny-test|sft-arith-r4-s0"


def test_adapter_hyper_parameters_loss_plot_and_headline_show_in_the_ui(small_lab, tmp_path):
    from playwright.sync_api import sync_playwright

    home = tmp_path / "home"
    shutil.copytree(small_lab["root"] / "home", home)
    (home / ".nux").mkdir(exist_ok=True)
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")  # no "join the community" dialog
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "LAB_EXPERIMENT": str(SMALL_EXPERIMENT),
        "LAB_STORAGE_ROOT": str(small_lab["root"] / "storage"),
        "LAB_SCRATCH_ROOT": str(tmp_path),
    }
    with dagster_webserver(env, tmp_path / "webserver.log") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 2400})
        page.set_default_timeout(120_000)  # a loaded 2-core machine renders slowly
        try:
            page.goto(
                f"{url}/assets/adapter?view=partitions&partition={PARTITION.replace('|', '%7C')}"
            )
            page.wait_for_selector("text=hp/learning_rate")
            body = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "adapter.png"))
            for key in (
                "hp/method",
                "hp/rank",
                "hp/learning_rate",
                "hp/steps",
                "loss/lora_sft/first",
                "loss/lora_sft/final",
                "loss_curve",
            ):
                assert key in body, key
            assert "loss_curve.png" in body  # the stored plot, linked by its path
            assert "data:image/png;base64" not in page.content()  # no inline PNG

            page.goto(f"{url}/assets/classification_results")
            page.wait_for_selector("text=headline")
            body = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "classification.png"))
            headline = next(
                line for line in body.splitlines() if line.startswith(("method ", "task "))
            )
            assert "vs chance" in headline and "[" in headline, headline
        finally:
            browser.close()
