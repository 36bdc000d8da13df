"""Step scratch directories that know their owner, so a dead owner's are found and removed.

The local step launcher deletes a step's scratch directory in its `finally`; a run
process that is SIGKILLed (or a machine that loses power) never gets there. Each
directory therefore holds ``owner.json`` naming the process that made it (host, pid,
start time); ``remove_leaked`` deletes the ``lab-*`` directories under a scratch root
whose owner is gone, and is called when the next `lab` starts. A directory with no
owner file is only removed once it is old (it may be one being made right now).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from resources.compute.local import procs
from resources.remote.protocol import SCRATCH_ROOT_ENV

OWNER_FILE = "owner.json"
PREFIX = "lab-"
_UNOWNED_AGE_S = 3600.0


def default_root() -> Path:
    """Where the step launcher makes scratch directories unless configured otherwise."""
    return Path(os.environ.get(SCRATCH_ROOT_ENV) or tempfile.gettempdir())


def claim(scratch: Path) -> None:
    """Record this process as the owner of `scratch`."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": procs.start_time(os.getpid())}
    (scratch / OWNER_FILE).write_text(json.dumps(me))


def _owner_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's (a shared scratch root): not ours to judge
    pid = int(owner.get("pid") or 0)
    if pid <= 0 or not procs.alive(pid):
        return False
    start = owner.get("start")
    return start is None or procs.start_time(pid) in (None, start)


def remove_leaked(root: Path) -> list[Path]:
    """Delete the scratch directories under `root` whose owning process is gone; returns them."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for d in sorted(root.glob(f"{PREFIX}*")):
        if not d.is_dir() or d.is_symlink():
            continue
        try:
            owner = json.loads((d / OWNER_FILE).read_text())
            leaked = not _owner_alive(owner)
        except FileNotFoundError:
            leaked = time.time() - d.stat().st_mtime > _UNOWNED_AGE_S
        except (OSError, ValueError):
            continue
        if leaked:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
    return removed
