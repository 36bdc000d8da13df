"""The agent that runs on a lab VM: reads its instructions, runs them, reports to GCS.

It must start before the lab's code is installed on the VM, so it and the modules
it is split into import only the standard library, google-cloud-storage and each
other (no gcloud, no gsutil, nothing else of the lab). The launcher ships each of
them, and ``resources.remote.protocol``, as an instance metadata attribute
(``protocol.VM_MODULES``: attribute -> file); the startup script lays them out as
``$LAB_HOME/agent/resources/remote/*.py`` with empty package ``__init__.py`` files
and runs ``main`` with that directory first on ``sys.path`` (not on
``PYTHONPATH``, and not as the working directory, so nothing the agent starts
sees those stubs). Its instructions are JSON in the attribute ``lab-launch``,
read from the metadata server (``agent_metadata``).

Modes (``mode`` in the instructions):

- ``step`` (``agent_step``): run one Dagster step, streaming its events, logs,
  checkpoints and a heartbeat to GCS (``agent_sync``); stop it cleanly on
  preemption.
- ``image-build`` and ``export-disk`` (``agent_image``): health-check an installed
  bundle; stream an attached disk to GCS for ``images.insert``.

The launch layout in GCS and every name shared with the launcher live in
``resources.remote.protocol``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from resources.remote.agent_image import run_export_disk, run_image_build
from resources.remote.agent_metadata import Metadata
from resources.remote.agent_step import StepAgent
from resources.remote.protocol import HOME_ENV, INSTRUCTIONS_KEY


def main() -> int:
    md = Metadata()
    raw = md.attribute(INSTRUCTIONS_KEY)
    if not raw:
        print(f"[agent] no '{INSTRUCTIONS_KEY}' metadata attribute: nothing to do", file=sys.stderr)
        return 2
    instr = json.loads(raw)
    home = Path(os.environ.get(HOME_ENV) or "/opt/lab/run")
    home.mkdir(parents=True, exist_ok=True)
    mode = instr.get("mode", "step")
    if mode == "image-build":
        return run_image_build(instr, home)
    if mode == "export-disk":
        return run_export_disk(instr)
    if mode != "step":
        print(f"[agent] unknown mode {mode!r}", file=sys.stderr)
        return 2
    agent = StepAgent(instr, md, home)
    signal.signal(signal.SIGTERM, lambda *_: agent.on_preempted("SIGTERM"))
    threading.Thread(target=agent._watch_preemption, daemon=True).start()
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
