"""Step scratch directories that know their owner, so a dead owner's are found and removed.

The local step launcher deletes a step's scratch directory in its `finally`; a run
process that is SIGKILLed (or a machine that loses power) never gets there. Each
directory therefore holds ``owner.json`` naming the process that made it (host, pid,
start time); ``remove_leaked`` deletes the ``lab-*`` directories under a scratch root
whose owner is gone, and is called when the next `lab` starts. Only directories named
as the launcher names them (``lab-<run id prefix>-…``) that hold an owner file are
ever touched: the scratch root may be the shared system temp directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from resources import procs
from resources.remote.protocol import SCRATCH_ROOT_ENV

OWNER_FILE = "owner.json"
PREFIX = "lab-"
_NAME = re.compile(r"^lab-[0-9a-f]{8}-[A-Za-z0-9_]+$")  # lab-<run id[:8]>-<mkdtemp suffix>


def default_root() -> Path:
    """Where the step launcher makes scratch directories unless configured otherwise."""
    return Path(os.environ.get(SCRATCH_ROOT_ENV) or tempfile.gettempdir())


def claim(scratch: Path) -> None:
    """Record this process as the owner of `scratch`."""
    (scratch / OWNER_FILE).write_text(json.dumps(procs.identity()))


def remove_leaked(root: Path) -> list[Path]:
    """Delete the scratch directories under `root` whose owning process is gone; returns them."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for d in sorted(root.glob(f"{PREFIX}*")):
        if not _NAME.match(d.name) or d.is_symlink() or not d.is_dir():
            continue
        try:
            owner = json.loads((d / OWNER_FILE).read_text())
            leaked = isinstance(owner, dict) and procs.gone(owner)
        except (OSError, ValueError):  # no owner file: not one of ours, or being made now
            continue
        if leaked:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
    return removed
