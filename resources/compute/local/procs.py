"""A local process's state from /proc: alive (not a zombie) and its start time.

The warm server's client, the lab's run launcher and the tests all ask "is pid N still
the process it was?"; a pid alone can be reused, so a recorded start time tells them
apart. Without procfs (macOS) liveness falls back to `kill(pid, 0)` and start times are
unknown (None). Standard library only.
"""

from __future__ import annotations

import os


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
