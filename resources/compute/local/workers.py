"""The two kinds of local step worker, behind one small interface the launcher polls.

``ColdWorker`` is a fresh ``python -m resources.remote.step_worker`` subprocess (it
pays every import itself; PDEATHSIG ties it to the run process). ``WarmWorker`` is a
child forked by the warm worker server (``warm_server`` / ``resources.remote.
fork_server``) with torch & co already imported; it is tied to the run process by
its open connection to the server. Both write stdout+stderr to a pipe this process
reads line by line, report their exit code, and can be stopped.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from typing import IO

from resources.compute.local import warm_server

STOP_GRACE_S = 10.0  # SIGTERM, then this long, then SIGKILL


def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    stream.close()


class _Worker:
    """Output lines arrive on `lines`; `poll()` is None while running, then the exit code."""

    pid: int
    description: str

    def __init__(self, stream: IO[str]):
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=_pump, args=(stream, self.lines), daemon=True)
        self._reader.start()

    def join_output(self, timeout_s: float = 5.0) -> None:
        self._reader.join(timeout=timeout_s)


class ColdWorker(_Worker):
    def __init__(self, python: str, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [python, "-m", "resources.remote.step_worker", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid
        self.description = f"a cold subprocess worker (pid {self.pid})"
        super().__init__(self.proc.stdout)

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def exited(self) -> bool:
        return self.proc.returncode is not None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        pass


def _die_with_parent() -> None:
    """In the cold worker, before exec: SIGTERM it if the run process dies (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class WarmWorker(_Worker):
    """A worker forked by the warm server. The server sends ``{"exit": code}`` when it
    reaps the worker; an EOF without it means the server died and the worker is gone
    too (the worker holds the server's end of the connection until it exits)."""

    def __init__(self, python: str, preload: tuple[str, ...], idle_timeout_s: float, request: dict):
        read_fd, write_fd = os.pipe()
        try:
            self.sock, self.pid, server_pid = warm_server.request_worker(
                python, preload, idle_timeout_s, request, write_fd
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.server_pid = server_pid
        self.returncode: int | None = None
        self.exited = False
        self.description = f"a warm worker (pid {self.pid}, forked by server pid {server_pid})"
        super().__init__(os.fdopen(read_fd, "r", encoding="utf-8", errors="replace"))

    def poll(self) -> int | None:
        self._read(0)
        return self.returncode

    def _read(self, timeout_s: float) -> None:
        if self.exited or not select.select([self.sock], [], [], timeout_s)[0]:
            return
        try:
            data = self.sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            self.exited = True  # the server died; the worker holds its end until it exits
            return
        message = json.loads(data)
        if "exit" in message:
            self.returncode = int(message["exit"])
            self.exited = True

    def stop(self) -> None:
        """Terminate the worker's process group, then kill it, waiting for the server's word."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.exited:
                return
            try:
                os.killpg(self.pid, sig)
            except OSError:
                try:
                    os.kill(self.pid, sig)  # before its setsid, the group is the server's
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_GRACE_S
            while not self.exited and time.monotonic() < deadline:
                self._read(0.1)

    def close(self) -> None:
        """Closing the connection tells the server (and a still-running worker) we are done."""
        self.sock.close()
