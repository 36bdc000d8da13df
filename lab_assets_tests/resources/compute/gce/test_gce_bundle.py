"""The launch bundle: a real wheel of the working tree, and an agent that needs no lab code."""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile

from lab_assets_tests.fakes.fake_compute import REPO_ROOT
from lab_assets_tests.fakes.fake_machine import Machine
from resources.compute.gce import vm_spec as vmbody
from resources.compute.gce.bundle import build_wheel, source_hash
from resources.remote import protocol, vm_boot


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
    """On a fresh VM the agent runs before the bundle is installed.

    Its modules are laid out by the real startup script from (fake) instance
    metadata, then imported the way ``AGENT_BOOT`` does, from the VM's working
    directory, with the interpreter isolated from this checkout.
    """
    home = tmp_path / "lab"
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / "bin" / "python").symlink_to("/bin/true")  # the agent is run below
    items = {**vmbody.vm_module_sources(), protocol.INSTRUCTIONS_KEY: "{}"}
    # the machine's systemd runs the agent's unit: /bin/true
    with Machine(tmp_path / "vm", items, LAB_HOME=str(home)) as vm:
        res = vm.run(vmbody.startup_script(lab_home=str(home)))
    assert res.returncode == 0, res.stderr
    agent_dir = str(home / "agent")
    probe = vm_boot.AGENT_BOOT.split("from ")[0] + (
        "import resources.remote.agent as agent; agent.Metadata('127.0.0.1:9'); "
        "from resources.remote.protocol import make_storage_client; "
        "make_storage_client(endpoint='http://127.0.0.1:9'); "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'dagster', 'lab_assets', 'torch', 'pydantic', 'yaml'}); "
        "bad += sorted(m for m, mod in sys.modules.items() if m.split('.')[0] == 'resources' "
        f"and not (getattr(mod, '__file__', None) or '').startswith({agent_dir!r})); "
        "print('BAD', bad)"
    )
    res = subprocess.run(
        [sys.executable, "-I", "-c", probe, agent_dir],
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "BAD []"
