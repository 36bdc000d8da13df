"""The agent's life as the systemd unit ``lab-agent.service``: pid file, own log, exit marker.

The unit's ``ExecStart`` calls ``run()`` (see ``vm_boot.unit``), which wraps the
agent's ``main``:

- ``<agent home>/agent.pid`` names the unit's main process, so the shutdown script
  can ask it to checkpoint (SIGTERM) on a preemption, stop or delete;
- the agent's output goes to the unit's stdout (the journal and the serial console)
  and is appended to ``<agent home>/agent.log``; neither depends on a pipe another
  process holds, and a failing write to one never stops the other or the agent;
- ``<agent home>/agent.exited`` is written when ``main`` has returned, i.e. after its
  final flush: every event, log line and checkpoint it had is in GCS. The shutdown
  script waits for it (bounded) before letting the shutdown go on.

Standard library only (it ships to the VM beside the agent).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

from resources.remote.protocol import AGENT_EXITED_FILE, AGENT_LOG_FILE, AGENT_PID_FILE, HOME_ENV


class Tee:
    """A text stream writing to several; a stream that fails is dropped, never raised."""

    def __init__(self, *streams: TextIO):
        self.streams = [s for s in streams if s is not None]

    def write(self, s: str) -> int:
        for st in list(self.streams):
            try:
                st.write(s)
                st.flush()
            except (OSError, ValueError):
                self.streams.remove(st)
        return len(s)

    def flush(self) -> None:
        for st in list(self.streams):
            try:
                st.flush()
            except (OSError, ValueError):
                self.streams.remove(st)

    def isatty(self) -> bool:
        return False


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or "/opt/lab/run")


def run() -> int:
    """Run the agent's ``main`` as the unit's main process (see the module docstring)."""
    h = home()
    h.mkdir(parents=True, exist_ok=True)
    (h / AGENT_EXITED_FILE).unlink(missing_ok=True)
    log = open(h / AGENT_LOG_FILE, "a", buffering=1)  # open as long as the agent runs
    sys.stdout = Tee(sys.__stdout__, log)  # type: ignore[assignment]
    sys.stderr = Tee(sys.__stderr__, log)  # type: ignore[assignment]
    pid = h / AGENT_PID_FILE
    tmp = pid.with_name(pid.name + ".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(pid)
    print(f"[agent] pid {os.getpid()} started at {time.strftime('%H:%M:%S')}", flush=True)
    rc = 1
    try:
        from resources.remote.agent import main

        rc = main()
        return rc
    finally:
        print(f"[agent] exiting with code {rc}", flush=True)
        (h / AGENT_EXITED_FILE).write_text(f"{rc}\n")
