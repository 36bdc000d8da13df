"""The fake VM's systemd: the units its startup script starts, and how a shutdown stops them.

On a real VM the startup script's ``systemctl start lab-agent.service`` asks PID 1 to
run the unit's ``ExecStart`` in a cgroup of its own, outside the startup-script
runner. Here the ``systemctl`` shim (``vm_shims``) parses the unit file as strictly
as systemd and POSTs it to the fake instance's metadata server
(``/fake-systemd/start``), which hands it to this class: the test process plays
PID 1, so it owns (and reaps) the unit's processes. Each unit runs in its own
process group (its "cgroup"), with the machine's environment plus the unit's
``Environment=``, in its ``WorkingDirectory=``, its output where
``StandardOutput=`` says (``console``: the serial log).

``stop_all`` is the ACPI shutdown's part: each unit's processes get the signal its
``KillMode=`` names (``mixed``: SIGTERM to the main process only), then SIGKILL for
the whole group after ``TimeoutStopSec=`` (or when the power goes first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHUTDOWN_SERVICE = "google-shutdown-scripts.service"


@dataclass
class Unit:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    kill_mode: str
    timeout_stop_s: float
    stdout: str
    before: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def stops_after_the_shutdown_script(self) -> bool:
        return SHUTDOWN_SERVICE in self.before

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class FakeSystemd:
    """PID 1 of one fake VM, for the units started through the ``systemctl`` shim."""

    def __init__(self, machine_env: dict[str, str], serial_log: Path, journal: Path):
        self.machine_env = machine_env
        self.serial_log, self.journal = serial_log, journal
        self.units: dict[str, Unit] = {}
        self.events: list[str] = []  # what happened, in order (for tests)
        self.lock = threading.Lock()
        self.powered_off = False

    def _output(self, where: str):
        if where in ("console", "journal+console", "tty"):
            return open(self.serial_log, "ab")
        if where == "journal":
            return open(self.journal, "ab")
        if where.startswith(("append:", "file:")):
            return open(where.split(":", 1)[1], "ab")
        if where == "null":
            return open(os.devnull, "wb")
        raise ValueError(f"StandardOutput={where} is not supported by the fake")

    def start(self, spec: dict[str, Any]) -> str:
        """Start a unit from the shim's parsed spec; returns "" or why it did not start."""
        with self.lock:
            if self.powered_off:
                return "the machine is shutting down"
            old = self.units.get(spec["name"])
            if old is not None and old.running():
                return ""  # `systemctl start` of an active unit does nothing
            unit = Unit(
                name=spec["name"],
                argv=list(spec["argv"]),
                env=dict(spec.get("env") or {}),
                cwd=spec.get("cwd") or "/",
                kill_mode=spec.get("kill_mode", "control-group"),
                timeout_stop_s=float(spec.get("timeout_stop_s", 90)),
                stdout=spec.get("stdout", "journal"),
                before=list(spec.get("before") or []),
            )
            if not os.path.isdir(unit.cwd):
                return f"WorkingDirectory={unit.cwd} does not exist (status=200/CHDIR)"
            out = self._output(unit.stdout)
            try:
                unit.proc = subprocess.Popen(
                    unit.argv,
                    cwd=unit.cwd,
                    env={**self.machine_env, **unit.env},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                return f"{unit.argv[0]}: {e} (status=203/EXEC)"
            finally:
                out.close()
            self.units[unit.name] = unit
            self.events.append(f"start {unit.name} pid {unit.proc.pid}")
            return ""

    def stop_all(self, power_off_at: float, only: list[Unit] | None = None) -> None:
        """Stop units as systemd does at shutdown, but never past `power_off_at` (monotonic)."""
        units = [u for u in (only if only is not None else list(self.units.values())) if u.proc]
        threads = [threading.Thread(target=self._stop, args=(u, power_off_at)) for u in units]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _stop(self, unit: Unit, power_off_at: float) -> None:
        proc = unit.proc
        assert proc is not None
        if proc.poll() is not None:
            return
        sig_to_group = unit.kill_mode == "control-group"
        self.events.append(
            f"stop {unit.name}: SIGTERM to {'the group' if sig_to_group else 'the main process'}"
        )
        try:
            if sig_to_group:
                os.killpg(proc.pid, signal.SIGTERM)
            elif unit.kill_mode != "none":
                proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = min(time.monotonic() + unit.timeout_stop_s, power_off_at)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            self.events.append(f"stopped {unit.name}: exit {proc.returncode}")
        except subprocess.TimeoutExpired:
            self.events.append(f"stop {unit.name}: timed out, SIGKILL")
        self._kill_group(proc)

    def kill_all(self) -> None:
        """The power goes: every unit's processes die at once."""
        with self.lock:
            self.powered_off = True
            units = list(self.units.values())
        for u in units:
            if u.proc is not None:
                self._kill_group(u.proc)

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        proc.wait()
