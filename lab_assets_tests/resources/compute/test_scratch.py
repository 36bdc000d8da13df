"""Leaked step scratch directories are removed; nothing else under the scratch root is.

The scratch root defaults to the system temp directory, which other programs (and the
lab's own warm-server sockets, Postgres data in tests, in-process output dirs) share.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

from resources.compute.local import scratch


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_only_launcher_dirs_of_dead_owners_are_removed(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / "lab-0123abcd-x1y2"
    dead.mkdir()
    (dead / scratch.OWNER_FILE).write_text(json.dumps({"host": host, "pid": _dead_pid()}))
    mine = tmp_path / "lab-89abcdef-live"
    mine.mkdir()
    scratch.claim(mine)  # this process: alive
    other_host = tmp_path / "lab-00000000-far"
    other_host.mkdir()
    (other_host / scratch.OWNER_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    unowned = tmp_path / "lab-11111111-new"  # being made right now: no owner file yet
    unowned.mkdir()
    others = [tmp_path / n for n in ("lab-scratch", "lab-warm-0", "lab-pg-abcd")]
    for d in others:
        d.mkdir()
        os.utime(d, (0, 0))  # however old
        (d / scratch.OWNER_FILE).write_text(json.dumps({"host": host, "pid": _dead_pid()}))

    assert scratch.remove_leaked(tmp_path) == [dead]
    assert not dead.exists()
    assert all(d.exists() for d in (mine, other_host, unowned, *others))
