"""A local process's state from /proc: alive (not a zombie) and its start time.

The warm server's client, the lab's run launcher and the tests all ask "is pid N still
the process it was?"; a pid alone can be reused, so a recorded start time tells them
apart. Without procfs (macOS) liveness falls back to `kill(pid, 0)` and start times are
unknown (None). Standard library only.
"""

from __future__ import annotations

import os
import socket


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None: unknown or gone)."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None


def identity(pid: int | None = None) -> dict:
    """Who a process is, to record beside what it owns: host, pid and start time."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start": start_time(pid)}


def gone(record: dict) -> bool:
    """True if `record` (from `identity`) names a process of this host that no longer
    runs (dead, a zombie, or its pid now another process's). Another host's: False."""
    if record.get("host") != socket.gethostname():
        return False
    pid = int(record.get("pid") or 0)
    if pid <= 0 or not alive(pid):
        return True
    start = record.get("start")
    return start is not None and start_time(pid) not in (None, start)
