"""The level a step worker's raw output line deserves when it is relayed into the run.

A worker's output stream (a VM's ``logs`` chunks) holds three kinds of line: the
console echo of Dagster log messages, which reach the run as events already, with
their own level, timestamp and run id, so relaying them again doubled every line and
demoted its level; Python's own output (``logging``'s default format, ``warnings``,
tracebacks) whose level can be read off the line; and everything else (prints,
progress bars). ``WorkerLines.level`` says which level each line keeps, or None for
the echoes, which are dropped.
"""

from __future__ import annotations

import logging
import re

_DAGSTER_ECHO = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:[.,]\d+)? [+-]\d{4} - dagster - "
    r"(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) - "
)
_LOGGING_DEFAULT = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]*:")
_WARNING = re.compile(r"\b[A-Z]\w*Warning: ")
_PROGRESS = re.compile(r"\d+%\|")


class WorkerLines:
    """Per stream, since a traceback spans lines: ``level(line)`` for each line in order."""

    def __init__(self) -> None:
        self._in_traceback = False

    def level(self, line: str) -> int | None:
        """The logging level to relay `line` at; None: it is an echo of a relayed event."""
        if _DAGSTER_ECHO.match(line):
            self._in_traceback = False
            return None
        if line.startswith("Traceback (most recent call last):"):
            self._in_traceback = True
            return logging.ERROR
        if self._in_traceback:
            if not line[:1].isspace():  # the exception line ends the traceback
                self._in_traceback = False
            return logging.ERROR
        m = _LOGGING_DEFAULT.match(line)
        if m:
            return logging.getLevelName(m.group(1))
        if _WARNING.search(line):
            return logging.WARNING
        if _PROGRESS.search(line):
            return logging.DEBUG
        return logging.INFO
