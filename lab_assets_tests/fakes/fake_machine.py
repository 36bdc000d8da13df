"""One fake VM without the Compute API around it, for tests of the VM's scripts alone.

It has what a VM's startup and shutdown scripts talk to: a metadata server serving
the given items, the fake PID 1 (``fake_systemd``) that the ``systemctl`` shim hands
units to, the shims first on ``PATH`` (``vm_shims``), and a serial console log.
``FakeCompute`` boots its instances with the same parts (``fake_vms``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from lab_assets_tests.fakes.fake_metadata import FakeInstance, MetadataServer
from lab_assets_tests.fakes.fake_systemd import FakeSystemd
from lab_assets_tests.fakes.fake_vms import machine_env


class Machine:
    """A fake VM under `root`: ``run(script)`` runs a script on it as GCE's guest agent would."""

    def __init__(self, root: Path, items: dict[str, str], gpus: list | None = None, **env: str):
        self.inst = FakeInstance(
            "p", "us-central1-a", {"name": "vm", "guestAccelerators": gpus or []}
        )
        self.inst.body["metadata"] = {"items": [{"key": k, "value": v} for k, v in items.items()]}
        self.inst.home = root
        root.mkdir(parents=True, exist_ok=True)
        self.server = MetadataServer(None, self.inst)
        self.inst.metadata_server = self.server
        self.lab_home = root / "lab"
        self.env = machine_env(
            self.inst, self.lab_home, root / "dev", shims=root / "shims", overrides=env
        )
        self.serial = root / "serial.log"
        self.systemd = FakeSystemd(self.env, self.serial, root / "journal.log")
        self.inst.systemd = self.systemd

    def run(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `script` with bash on the machine; its output also goes to the console."""
        res = subprocess.run(
            ["bash", "-c", script],
            cwd=self.inst.home,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        with open(self.serial, "a") as f:
            f.write(res.stdout + res.stderr)
        return res

    def close(self) -> None:
        self.systemd.kill_all()
        self.server.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
