"""The Dagster UI, driven in headless Chromium: the graph, and a partition launched from it.

Starts `dagster-webserver` on 127.0.0.1 over the small experiment (run coordinator:
launch at once, so no daemon is needed), opens the lineage graph, finds the five
assets, launches `base_model[tiny-test]` from the asset page's Materialize dialog,
and watches the run list until that run succeeds. Chromium is Debian's
(`scripts/setup.sh --test` installs it); Playwright drives it, never downloading
a browser of its own.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lab_assets_tests.conftest import SMALL_EXPERIMENT, TESTS_DIR
from resources.storage.local import LocalArtifactStore

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ASSETS = ["base_model", "base_spectrum", "adapter", "spectral_features", "classification_results"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webserver(tmp_path):
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed: run `bash scripts/setup.sh --test`")
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\n"
        "run_coordinator:\n  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
    )
    # Dagster's one-time "join the community" dialog would pop up over the page at an
    # unpredictable moment; this instance has "seen" it (dagster/_core/nux.py).
    (home / ".nux").mkdir()
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "LAB_EXPERIMENT": str(SMALL_EXPERIMENT),
        "LAB_STORAGE_ROOT": str(tmp_path / "storage"),
        "LAB_SCRATCH_ROOT": str(tmp_path),
    }
    with dagster_webserver(env, tmp_path / "webserver.log") as url:
        yield {"url": url, "storage": tmp_path / "storage", "shots": tmp_path}


@contextlib.contextmanager
def dagster_webserver(env: dict[str, str], log_path: Path, workspace: str = "workspace.yaml"):
    """`dagster-webserver` over the repo's `workspace` file on a free 127.0.0.1 port; yields
    its URL."""
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster_webserver",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            str(TESTS_DIR.parent / workspace),
        ],
        cwd=TESTS_DIR.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/server_info", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(log_path.read_text()[-3000:]) from None
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_graph_shows_the_assets_and_a_partition_launches_from_the_ui(webserver):
    from playwright.sync_api import sync_playwright

    url = webserver["url"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)  # a loaded 2-core machine renders slowly
        try:
            page.goto(url + "/asset-groups")
            page.wait_for_selector("text=classific")
            graph = page.inner_text("body")
            for name in ASSETS:
                assert name in graph, name
            page.screenshot(path=str(webserver["shots"] / "graph.png"))

            page.goto(url + "/assets/base_model")
            page.get_by_role("button", name="Materialize").first.click()
            title = page.get_by_text("Launch runs to materialize base_model")
            title.wait_for()
            page.get_by_text("Select a partition or create one").click()
            page.locator(".dagster-popover").locator("label").filter(
                has_text="tiny-test"
            ).first.click()
            title.click()  # closes the partition picker, keeps the dialog
            launch = page.get_by_role("button", name="Launch 1 run")
            page.screenshot(path=str(webserver["shots"] / "dialog.png"))
            launch.click()
            title.wait_for(state="hidden")  # the dialog closes once the run is launched
            page.screenshot(path=str(webserver["shots"] / "launched.png"))

            page.goto(url + "/runs")
            deadline = time.time() + 240
            status = ""
            while time.time() < deadline:
                page.wait_for_timeout(2000)
                status = page.inner_text("body")
                if "partition: tiny-test" in status and (
                    "Success" in status or "Failure" in status
                ):
                    break
                page.reload()
            page.screenshot(path=str(webserver["shots"] / "runs.png"))
            log_tail = (webserver["shots"] / "webserver.log").read_text()[-3000:]
            assert "partition: tiny-test" in status, f"no run listed; webserver log:\n{log_tail}"
            assert "Success" in status, f"{status[-1500:]}\nwebserver log:\n{log_tail}"
        finally:
            browser.close()
    store = LocalArtifactStore(str(webserver["storage"]), "small")
    assert store.is_complete("base_model", "tiny-test")
    assert store.verify("base_model", "tiny-test") == []
