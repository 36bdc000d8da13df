"""The fake Compute Engine's VM lifecycle: boot runs the agent; stop, delete, preempt end it.

Split out of ``fake_compute`` as a mixin of ``FakeCompute``. An instance "boots"
as GCE's guest agent boots it: its own ``startup-script`` metadata runs with bash,
in a local subprocess (its own session, so the whole process group can be signalled)
whose ``GCE_METADATA_HOST`` names the instance's ``MetadataServer``; the script
fetches the agent's modules from that server and execs the agent in the "image's"
venv (this interpreter). An instance with no startup script runs the agent directly. Ending a VM
follows GCE: STOPPING while the agent gets SIGTERM and a grace period, then
SIGKILL, then the instance is gone; a delete's operation is DONE only after that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lab_assets_tests.fakes.fake_metadata import FakeInstance, MetadataServer

if TYPE_CHECKING:
    from lab_assets_tests.fakes.fake_compute_wire import Operation

REPO_ROOT = Path(__file__).resolve().parents[2]


class VmLifecycle:
    """`FakeCompute`'s instance lifecycle; expects the attributes `FakeCompute` sets."""

    boot: bool
    boot_delay_s: float
    op_delay_s: float
    agent_env: dict[str, str]
    python: str
    instances: dict[tuple[str, str, str], FakeInstance]
    deleted: list[dict]
    history: list[tuple[float, int, dict]]
    operations: dict[str, Operation]
    disks: dict[tuple[str, str, str], dict]
    lock: threading.RLock
    on_boot: list[Callable[[FakeInstance], None]]
    _tmp: Path
    _record_op: Callable[..., dict]
    find: Callable[[str], FakeInstance | None]

    def preempt(self, name: str, grace_s: float = 5.0, wait: bool = False) -> None:
        """Spot preemption: preempted=TRUE, SIGTERM, SIGKILL after `grace_s`, then deleted."""
        inst = self.find(name)
        if inst is None:
            return
        with inst.changed:
            inst.preempted = True
            inst.changed.notify_all()
        self._record_op(inst.project, inst.zone, "compute.instances.preempted", inst, system=True)
        inst.status = "STOPPING"

        def finish():
            self._stop_agent(inst, grace_s=grace_s)
            inst.status = "TERMINATED"
            action = inst.body.get("scheduling", {}).get("instanceTerminationAction", "STOP")
            if action == "DELETE":
                self._remove(inst)

        t = threading.Thread(target=finish, daemon=True)
        t.start()
        if wait:
            t.join()

    def crash(self, name: str) -> None:
        """The VM dies under the agent (host error): processes killed, instance TERMINATED."""
        inst = self.find(name)
        if inst is None:
            return
        self._stop_agent(inst, grace_s=0)
        inst.status = "TERMINATED"

    def _boot(self, inst: FakeInstance) -> None:
        time.sleep(self.op_delay_s + self.boot_delay_s)
        with self.lock:
            if (inst.project, inst.zone, inst.name) not in self.instances:
                return
            inst.status = "RUNNING"
        duration = (inst.body.get("scheduling") or {}).get("maxRunDuration")
        if duration:
            limit = float(duration.get("seconds", 0)) + float(duration.get("nanos", 0)) / 1e9
            timer = threading.Timer(limit, self._dead_man, args=(inst,))
            timer.daemon = True
            timer.start()
        for hook in self.on_boot:
            hook(inst)
        if not self.boot:
            return
        inst.metadata_server = MetadataServer(self, inst)
        inst.home = self._tmp / inst.name
        inst.home.mkdir(parents=True, exist_ok=True)
        devices = inst.home / "dev"
        devices.mkdir(exist_ok=True)
        for d in inst.body.get("disks", []):
            if not d.get("boot") and d.get("deviceName"):
                # An attached data disk shows up as a (small) block device file.
                src = self.disks.get((inst.project, inst.zone, d["source"].rsplit("/", 1)[-1]))
                (devices / f"google-{d['deviceName']}").write_bytes(
                    (src or {}).get("_content", b"\0" * 4096)
                )
        lab_home = inst.home / "lab"
        env = {
            **os.environ,
            **self.agent_env,
            "GCE_METADATA_HOST": inst.metadata_server.host,
            "LAB_AGENT_HOME": str(lab_home / "run"),
            "LAB_AGENT_DEVICE_ROOT": str(devices),
            "PYTHONUNBUFFERED": "1",
            # The startup script's $LAB_HOME (default /opt/lab), and where the step worker
            # finds the lab's code with `bundle_install: skip` (the image's venv has it).
            "LAB_HOME": str(lab_home),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
            ),
        }
        script = inst.metadata_items().get("startup-script")
        if script:
            # What GCE's guest agent does at boot: run the instance's startup script with
            # bash. The pre-baked image's venv is this interpreter; the script fetches the
            # agent's modules from the metadata server and execs the agent from them.
            venv = lab_home / "venv"
            ours = Path(self.python).parent.parent  # this interpreter's venv, if it is one
            if not venv.exists():
                lab_home.mkdir(parents=True, exist_ok=True)
                if (ours / "pyvenv.cfg").is_file():
                    venv.symlink_to(ours, target_is_directory=True)  # its site-packages too
                else:
                    (venv / "bin").mkdir(parents=True)
                    (venv / "bin" / "python").symlink_to(self.python)
            argv, cwd = ["bash", "-c", script], inst.home
        else:
            argv, cwd = [self.python, "-m", "resources.remote.agent"], REPO_ROOT
        log = open(inst.home / "serial.log", "ab")
        with self.lock:
            if (inst.project, inst.zone, inst.name) not in self.instances:
                return
            inst.proc = subprocess.Popen(
                argv,
                cwd=str(cwd),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.close()

    def serial_output(self, name: str) -> str:
        p = self._tmp / name / "serial.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def _dead_man(self, inst: FakeInstance) -> None:
        op = self._record_op(
            inst.project, inst.zone, "compute.instances.stop", inst, system=True, pending=True
        )
        self._delete(inst, op["name"])

    def _stop_agent(self, inst: FakeInstance, grace_s: float) -> None:
        proc = inst.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def _delete(self, inst: FakeInstance, op_name: str | None = None) -> None:
        """Stop the agent (1 s grace), remove the instance, then mark `op_name` DONE."""
        inst.status = "STOPPING"
        try:
            self._stop_agent(inst, grace_s=1.0)
            self._remove(inst)
        finally:
            if op_name is not None:
                self.operations[op_name].finish()

    def _remove(self, inst: FakeInstance) -> None:
        with self.lock:
            if self.instances.pop((inst.project, inst.zone, inst.name), None) is None:
                return
            self.deleted.append(inst.to_json())
            self.history.append((time.time(), -1, inst.body))
            for d in inst.body.get("disks", []):
                if d.get("boot") and d.get("autoDelete", True):
                    dname = (d.get("initializeParams") or {}).get("diskName") or inst.name
                    self.disks.pop((inst.project, inst.zone, dname), None)
        inst.status = "TERMINATED"
        if inst.metadata_server:
            inst.metadata_server.close()
