"""The launch bundle: a real wheel of the working tree, and an agent that needs no lab code."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile

from lab_assets_tests.fakes.fake_compute import REPO_ROOT
from resources.compute.gce.bundle import build_wheel, source_hash


def test_the_wheel_holds_the_working_tree_and_is_reused(tmp_path):
    t0 = time.perf_counter()
    wheel = build_wheel(REPO_ROOT, cache_dir=tmp_path)
    built_s = time.perf_counter() - t0
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lab_assets/definitions.py" in names and "lab_assets/cli/gce.py" in names
    assert "resources/remote/agent.py" in names and "resources/compute/gce/launcher.py" in names
    assert "resources/remote/step_worker.py" in names
    assert not any("__pycache__" in n or n.startswith("lab_assets_tests/") for n in names)
    # what runs is the working tree as it is now, committed or not
    data = zipfile.ZipFile(wheel).read("resources/compute/gce/launcher.py")
    assert data == (REPO_ROOT / "resources/compute/gce/launcher.py").read_bytes()
    t0 = time.perf_counter()
    assert build_wheel(REPO_ROOT, cache_dir=tmp_path) == wheel  # same sources: cached
    assert time.perf_counter() - t0 < built_s
    assert wheel.parent.name == source_hash(REPO_ROOT)


def test_the_agent_imports_only_the_standard_library_and_google_cloud_storage(tmp_path):
    """On a fresh VM the agent runs before the bundle is installed."""
    shutil.copy(REPO_ROOT / "resources" / "gce_agent.py", tmp_path / "gce_agent.py")
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gce_agent; "
        "gce_agent.storage_client; gce_agent.Metadata('127.0.0.1:9'); "
        "from google.cloud import storage; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'dagster', 'lab_assets', 'resources', 'torch', 'pydantic', 'yaml'}); "
        "print('BAD', bad)"
    )
    res = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "BAD []"
