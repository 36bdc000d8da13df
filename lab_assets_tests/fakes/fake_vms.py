"""The fake Compute Engine's VM lifecycle: boot runs the startup script; shutdowns end it.

Split out of ``fake_compute`` as a mixin of ``FakeCompute``. An instance "boots"
as GCE's guest agent boots it: its own ``startup-script`` metadata runs with bash,
in a local subprocess (its own session) whose ``GCE_METADATA_HOST`` names the
instance's ``MetadataServer``, with the shims of ``vm_shims`` first on ``PATH`` for
what cannot run here (systemctl, apt, uv's downloads, nvidia-smi). What the image
holds decides the branch the script takes, as on GCE: the lab's pre-baked image has
``$LAB_HOME/venv`` (a link to this interpreter's venv), a Deep Learning VM image
(``vm_spec.DLVM_PROJECT``) has not, so the real bootstrap runs through the shims. A
unit the script starts runs under the VM's fake PID 1 (``fake_systemd``), outside the
script's process. An instance with no startup script runs the agent directly.

Shutdowns follow GCE. A preemption: ``instance/preempted`` turns TRUE, the
``shutdown-script`` runs (before the units whose ``Before=`` orders them after it, else
beside them), the ACPI shutdown stops the units (``KillMode=``, ``TimeoutStopSec=``), and
the power goes ``grace_s`` (GCE: 30 s) after the flip, whatever is still running. A
stop or delete is the same shutdown without the flip (here with a 1 s grace); a crash
is the power going at once. ``boot_failures`` (command prefix -> message) makes a shim
fail on purpose at the next boots; ``vm_env`` adds to the VMs' environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lab_assets_tests.fakes import vm_shims
from lab_assets_tests.fakes.fake_compute_wire import ApiError
from lab_assets_tests.fakes.fake_metadata import FakeInstance, MetadataServer
from lab_assets_tests.fakes.fake_systemd import FakeSystemd
from resources.compute.gce.vm_spec import DLVM_PROJECT

if TYPE_CHECKING:
    from lab_assets_tests.fakes.fake_compute_wire import Operation

REPO_ROOT = Path(__file__).resolve().parents[2]
SERIAL_BUFFER = 1 << 20  # GCE keeps the last 1 MiB of each serial port
GPU_NAMES = {"nvidia-l4": "NVIDIA L4", "nvidia-tesla-a100": "NVIDIA A100-SXM4-40GB"}


def is_fallback_image(body: dict) -> bool:
    """Whether the boot disk comes from a Deep Learning VM image (no lab venv on it)."""
    for d in body.get("disks", []):
        src = (d.get("initializeParams") or {}).get("sourceImage") or ""
        if d.get("boot") and f"projects/{DLVM_PROJECT}/" in src:
            return True
    return False


def machine_env(
    inst: FakeInstance,
    lab_home: Path,
    devices: Path,
    *,
    shims: Path,
    python: str = sys.executable,
    extra: dict[str, str] | None = None,
    overrides: dict[str, str] | None = None,
) -> dict[str, str]:
    """A fake VM's environment as its startup script and its units see it, and its PCI GPUs.

    `inst` must have its ``home`` and ``metadata_server``; `extra` goes before the
    machine's own variables, `overrides` after. Tests of the scripts alone use it too."""
    assert inst.home is not None and inst.metadata_server is not None
    accels = inst.body.get("guestAccelerators", [])
    gpus = sum(int(a.get("acceleratorCount", 0)) for a in accels)
    gpu_type = accels[0]["acceleratorType"].rsplit("/", 1)[-1] if accels else ""
    pci = inst.home / "pci"
    for i in range(gpus):  # what the kernel shows of the attached GPUs
        dev = pci / f"0000:00:{4 + i:02x}.0"
        dev.mkdir(parents=True, exist_ok=True)
        (dev / "vendor").write_text("0x10de\n")
    pci.mkdir(parents=True, exist_ok=True)
    vm_shims.install(shims, python)
    ours = Path(python).parent.parent
    env = {
        **os.environ,
        **(extra or {}),
        "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(inst.home / "root"),
        "GCE_METADATA_HOST": inst.metadata_server.host,
        "LAB_AGENT_DEVICE_ROOT": str(devices),
        "PYTHONUNBUFFERED": "1",
        # The startup script's $LAB_HOME (default /opt/lab), and where the step worker
        # finds the lab's code with `bundle_install: skip` (the image's venv has it).
        "LAB_HOME": str(lab_home),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
        ),
        # Where this machine's systemd reads units, and its PCI devices.
        "LAB_UNIT_DIR": str(inst.home / "etc-systemd-system"),
        "LAB_PCI_DEVICES": str(pci),
        # The shims' view of the machine.
        "LAB_FAKE_SYSTEMD": inst.metadata_server.host,
        "LAB_FAKE_PYTHON": python,
        "LAB_FAKE_VENV": str(ours) if (ours / "pyvenv.cfg").is_file() else "",
        "LAB_FAKE_GPUS": str(gpus),
        "LAB_FAKE_GPU_NAME": GPU_NAMES.get(gpu_type, gpu_type),
        **(overrides or {}),
    }
    env.pop("LAB_AGENT_HOME", None)  # the agent's unit sets it, as on a VM
    (inst.home / "root").mkdir(exist_ok=True)
    return env


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
    boot_failures: dict[str, str]
    vm_env: dict[str, str]
    _tmp: Path
    _record_op: Callable[..., dict]
    find: Callable[[str], FakeInstance | None]

    def preempt(self, name: str, grace_s: float = 30.0, wait: bool = False) -> None:
        """Spot preemption as GCE delivers it: ``instance/preempted`` TRUE, the shutdown
        script, the ACPI shutdown of the units, the power off `grace_s` after the flip;
        a ``compute.instances.preempted`` operation; then the instance is deleted."""
        inst = self.find(name)
        if inst is None:
            return
        power_off_at = time.monotonic() + grace_s
        with inst.changed:
            inst.preempted = True
            inst.changed.notify_all()
        inst.shutdown_events.append("preempted: instance/preempted is TRUE")
        self._record_op(inst.project, inst.zone, "compute.instances.preempted", inst, system=True)
        inst.status = "STOPPING"

        def finish():
            self._shutdown(inst, power_off_at)
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

    def fail_boot(self, command: str, message: str) -> None:
        """Every later boot's shim for `command` (a prefix: "uv python install") fails."""
        self.boot_failures[command] = message

    def _machine_env(self, inst: FakeInstance, lab_home: Path, devices: Path) -> dict[str, str]:
        assert inst.home is not None
        return machine_env(
            inst,
            lab_home,
            devices,
            shims=self._tmp / "shims",
            python=self.python,
            extra={**self.agent_env, "LAB_FAKE_FAIL": json.dumps(self.boot_failures)},
            overrides=self.vm_env,
        )

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
        env = self._machine_env(inst, lab_home, devices)
        inst.systemd = FakeSystemd(env, inst.home / "serial.log", inst.home / "journal.log")
        script = inst.metadata_items().get("startup-script")
        if script:
            # What GCE's guest agent does at boot: run the instance's startup script with
            # bash. The pre-baked image's venv is this interpreter's; a Deep Learning VM
            # image has none, and the script's bootstrap makes it (through the shims).
            venv = lab_home / "venv"
            ours = Path(self.python).parent.parent  # this interpreter's venv, if it is one
            if not venv.exists() and not is_fallback_image(inst.body):
                lab_home.mkdir(parents=True, exist_ok=True)
                if (ours / "pyvenv.cfg").is_file():
                    venv.symlink_to(ours, target_is_directory=True)  # its site-packages too
                else:
                    (venv / "bin").mkdir(parents=True)
                    (venv / "bin" / "python").symlink_to(self.python)
            argv, cwd = ["bash", "-c", script], inst.home
        else:
            argv, cwd = [self.python, "-m", "resources.remote.agent"], REPO_ROOT
            env["LAB_AGENT_HOME"] = str(lab_home / "run")
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

    def serial_port_output(self, inst: FakeInstance, q: dict) -> dict:
        """``instances.getSerialPortOutput`` as GCE answers it: the last 1 MiB of port 1 is
        kept; ``start`` < 0 counts back from the end, an older one is moved up to the
        oldest byte kept; ``next`` is where the next read should start."""
        port = q.get("port", "1")
        if port not in ("1", "2", "3", "4"):
            raise ApiError(400, "invalid", f"Invalid value for field 'port': '{port}'.")
        try:
            start = int(q.get("start", "0"))
        except ValueError:
            raise ApiError(
                400, "invalid", f"Invalid value for field 'start': '{q['start']}'."
            ) from None
        p = self._tmp / inst.name / "serial.log"
        data = p.read_bytes() if port == "1" and p.exists() else b""
        total = len(data)
        oldest = max(0, total - SERIAL_BUFFER)
        start = max(oldest, total + start) if start < 0 else max(oldest, min(start, total))
        return {
            "kind": "compute#serialPortOutput",
            "contents": data[start:].decode("utf-8", "replace"),
            "start": str(start),
            "next": str(total),
            "selfLink": inst.body.get("selfLink", "") + f"/serialPort?port={port}",
        }

    def _dead_man(self, inst: FakeInstance) -> None:
        op = self._record_op(
            inst.project, inst.zone, "compute.instances.stop", inst, system=True, pending=True
        )
        self._delete(inst, op["name"])

    def _shutdown(self, inst: FakeInstance, power_off_at: float) -> None:
        """The guest's shutdown, then the power off at `power_off_at` (monotonic) at the latest:
        the shutdown script and the ACPI stop of the units (in the order the units' ``Before=``
        gives), SIGTERM to what is left of the startup script, then SIGKILL to everything."""
        with self.lock:
            first, inst.shutting_down = not inst.shutting_down, True
        if not first:  # as on GCE: a stop or delete during a shutdown does not start another
            inst.powered_off.wait(timeout=max(0.0, power_off_at - time.monotonic()))
            self._power_off(inst)
            return
        ev = inst.shutdown_events
        sd: FakeSystemd | None = inst.systemd
        script = inst.metadata_items().get("shutdown-script")
        runner = None
        if script and sd is not None and not sd.powered_off:
            log = open(inst.home / "serial.log", "ab")  # type: ignore[operator]
            runner = subprocess.Popen(
                ["bash", "-c", script],
                cwd=str(inst.home),
                env=sd.machine_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            ev.append("shutdown-script started")
        units = list(sd.units.values()) if sd is not None else []
        after = [u for u in units if u.stops_after_the_shutdown_script]
        beside = [u for u in units if not u.stops_after_the_shutdown_script]
        stopping = threading.Thread(target=self._acpi, args=(inst, beside, power_off_at))
        stopping.start()
        if runner is not None:
            try:
                runner.wait(timeout=max(0.0, power_off_at - time.monotonic()))
                ev.append(f"shutdown-script exited {runner.returncode}")
            except subprocess.TimeoutExpired:
                ev.append("shutdown-script still running at power off")
        self._acpi(inst, after, power_off_at)
        stopping.join()
        proc = inst.proc  # the startup script, if still running (a bootstrap in progress)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=max(0.0, power_off_at - time.monotonic()))
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        ev.append("power off")
        self._power_off(inst)
        if runner is not None and runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()

    def _acpi(self, inst: FakeInstance, units: list, power_off_at: float) -> None:
        if inst.systemd is None or not units:
            return
        for u in units:
            if u.running():
                inst.shutdown_events.append(f"ACPI shutdown: stopping {u.name}")
        inst.systemd.stop_all(power_off_at, only=units)

    def _power_off(self, inst: FakeInstance) -> None:
        if inst.systemd is not None:
            inst.systemd.kill_all()
        proc = inst.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc is not None:
            proc.wait()
        inst.powered_off.set()

    def _stop_agent(self, inst: FakeInstance, grace_s: float) -> None:
        """Shut the VM down (as a stop or delete does: shutdown script, ACPI, power off after
        `grace_s`); with no grace the power just goes."""
        if grace_s <= 0:
            self._power_off(inst)
        else:
            self._shutdown(inst, time.monotonic() + grace_s)

    def _delete(self, inst: FakeInstance, op_name: str | None = None) -> None:
        """Shut the VM down (1 s grace), remove the instance, then mark `op_name` DONE."""
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
