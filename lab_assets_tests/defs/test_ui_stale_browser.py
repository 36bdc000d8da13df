"""Stale in the UI, and rebuilt from it: a hyper-parameter edit, seen and fixed in the browser.

Starts `dagster dev` (webserver + daemon) over a copy of the session's materialised
small experiment, edits one run's `learning_rate` in the copied experiment file,
reloads the definitions from the UI, and finds the stale partitions and the changed
field (`learning_rate 0.001 → 0.002`) on the partition's page (the `lab_staleness`
sensor's observation). Then it switches on the `rebuild_stale_and_missing`
automation sensor in the UI (the one action) and waits until exactly that adapter,
its spectral features and the classification have rematerialised, and nothing else.
Screenshots land in the test's tmp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance
from dagster._core.instance.ref import InstanceRef

from lab_assets.experiment.load import load_experiment
from lab_assets.orchestration.sweep import FRESH, assess
from lab_assets_tests.conftest import SMALL_EXPERIMENT, TESTS_DIR
from lab_assets_tests.defs.test_ui_browser import CHROMIUM, CHROMIUM_ARGS, free_port
from resources.storage.local import LocalArtifactStore

EDITED = "tiny-test|dpo-arith-r4-s1"
RUN_ENTRY = "{method: dpo, task: arith, seed: 1}"
ASSETS = ["base_model", "base_spectrum", "adapter", "spectral_features", "classification_results"]


@pytest.fixture
def dev_lab(small_lab, tmp_path):
    """`dagster dev` over a private copy of the materialised small lab."""
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed: run `bash scripts/setup.sh --test`")
    storage, home = tmp_path / "storage", tmp_path / "home"
    shutil.copytree(small_lab["root"] / "storage", storage)
    shutil.copytree(small_lab["root"] / "home", home)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (home / ".nux").mkdir(exist_ok=True)
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")  # no "join the community" dialog
    exp_file = tmp_path / "experiment.yaml"
    exp_file.write_text(SMALL_EXPERIMENT.read_text())
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "LAB_EXPERIMENT": str(exp_file),
        "LAB_STORAGE_ROOT": str(storage),
        "LAB_SCRATCH_ROOT": str(tmp_path),
    }
    port = free_port()
    log = open(tmp_path / "dev.log", "w")
    dagster = Path(sys.executable).with_name("dagster")
    proc = subprocess.Popen(
        [str(dagster), "dev", "-h", "127.0.0.1", "-p", str(port)]
        + ["-w", str(TESTS_DIR.parent / "workspace.yaml")],
        cwd=TESTS_DIR.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: webserver, daemon, code server
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), 180, "dagster dev to serve", proc, tmp_path / "dev.log")
        yield {
            "url": url,
            "exp_file": exp_file,
            "storage": storage,
            "home": home,
            "shots": tmp_path,
            "log": tmp_path / "dev.log",
            "proc": proc,
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _up(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/server_info", timeout=2)
        return True
    except OSError:
        return False


def wait_for(cond, timeout_s: float, what: str, proc=None, log: Path | None = None, every=2.0):
    deadline = time.time() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if (proc is not None and proc.poll() is not None) or time.time() > deadline:
            tail = log.read_text()[-4000:] if log else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(every)


def open_instance(home: Path) -> DagsterInstance:
    return DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))


def materialisation_counts(instance: DagsterInstance) -> dict[tuple[str, str | None], int]:
    out: dict[tuple[str, str | None], int] = {}
    for a in ASSETS:
        for rec in instance.fetch_materializations(AssetKey(a), limit=10_000).records:
            key = (a, rec.partition_key)
            out[key] = out.get(key, 0) + 1
    return out


def partition_page(url: str, asset: str, partition: str) -> str:
    q = urllib.parse.quote(partition, safe="")
    return f"{url}/assets/{asset}?view=partitions&partition={q}"


def see_text(page, url: str, text: str, timeout_s: float) -> None:
    """Reload `url` until `text` is on the page (the daemon works on its own time)."""

    def shown():
        page.goto(url)
        try:
            page.get_by_text(text).first.wait_for(timeout=10_000)
            return True
        except Exception:
            return False

    wait_for(shown, timeout_s, f"{text!r} on {url}", every=1.0)


def test_a_learning_rate_edit_shows_stale_in_the_ui_and_one_switch_rebuilds_it(dev_lab):
    from playwright.sync_api import sync_playwright

    url, shots = dev_lab["url"], dev_lab["shots"]
    with open_instance(dev_lab["home"]) as instance:
        before = materialisation_counts(instance)
    text = dev_lab["exp_file"].read_text()
    dev_lab["exp_file"].write_text(
        text.replace(RUN_ENTRY, RUN_ENTRY[:-1] + ", learning_rate: 0.002}")
    )

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(120_000)
        try:
            reload_definitions(page, url, shots)
            # the staleness sensor's observation names the field, on the partition's page
            adapter_page = partition_page(url, "adapter", EDITED)
            see_text(page, adapter_page, "learning_rate 0.001 → 0.002", 300)
            page.screenshot(path=str(shots / "2-adapter-stale.png"), full_page=True)
            see_text(page, partition_page(url, "spectral_features", EDITED), "stale", 60)
            page.screenshot(path=str(shots / "3-features-stale.png"), full_page=True)

            switch_on_rebuild(page, url, shots)
            exp = load_experiment(dev_lab["exp_file"])
            store = LocalArtifactStore(str(dev_lab["storage"]), exp.name)
            with open_instance(dev_lab["home"]) as instance:

                def all_fresh():
                    return all(s.state == FRESH for s in assess(exp, instance, store))

                wait_for(all_fresh, 900, "the rebuild", dev_lab["proc"], dev_lab["log"], 5)
                after = materialisation_counts(instance)
            see_text(page, adapter_page, "matches its recipe again", 300)
            page.screenshot(path=str(shots / "5-adapter-fresh.png"), full_page=True)
            page.goto(url + "/overview/backfills")
            page.wait_for_timeout(3000)
            page.screenshot(path=str(shots / "6-backfills.png"), full_page=True)
        finally:
            browser.close()

    grown = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert grown == {
        ("adapter", EDITED): 1,
        ("spectral_features", EDITED): 1,
        ("classification_results", None): 1,
    }


def reload_definitions(page, url: str, shots: Path) -> None:
    page.goto(url + "/locations")
    page.get_by_text("lab", exact=True).first.wait_for()
    page.get_by_role("button", name="Reload").first.click()
    page.wait_for_timeout(2000)
    page.get_by_text("Loaded").first.wait_for()
    page.screenshot(path=str(shots / "1-reloaded.png"), full_page=True)


def switch_on_rebuild(page, url: str, shots: Path) -> None:
    page.goto(url + "/locations/lab/sensors/rebuild_stale_and_missing")
    page.get_by_text("rebuild_stale_and_missing").first.wait_for()
    toggle = page.locator("input[type=checkbox]").first
    toggle.wait_for(state="attached")
    page.screenshot(path=str(shots / "4a-sensor-off.png"), full_page=True)
    toggle.evaluate("el => el.click()")  # the styled switch hides the input itself
    page.wait_for_function(
        "() => { const t = document.querySelector('input[type=checkbox]'); return t && t.checked }"
    )
    page.screenshot(path=str(shots / "4b-sensor-on.png"), full_page=True)
