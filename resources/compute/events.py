"""Reading a step worker's event stream while it is still being written.

The worker appends one serialized `EventLogEntry` a line. `EventTail` returns the
complete lines that arrived since the last read and keeps a partial last line for
the next, so a launcher can poll a local file or a cloud object the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dagster._core.events import DagsterEventType
from dagster._core.events.log import EventLogEntry
from dagster._serdes import deserialize_value

TERMINAL_EVENTS = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}


class EventDecoder:
    """Turns appended bytes into `EventLogEntry`s, one per complete line."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> Iterator[EventLogEntry]:
        buf = self._partial + data
        *lines, self._partial = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield deserialize_value(line.decode("utf-8"), EventLogEntry)


class LocalEventTail:
    """Polls a local events file from where the last poll stopped."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._decoder = EventDecoder()

    def poll(self) -> Iterator[EventLogEntry]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        yield from self._decoder.feed(data)


def is_terminal(entry: EventLogEntry) -> bool:
    return entry.is_dagster_event and entry.get_dagster_event().event_type in TERMINAL_EVENTS
