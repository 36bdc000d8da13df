"""The warm worker server: a long-lived process that forks one step worker per request.

A cold step worker pays seconds importing dagster, torch, transformers, peft, trl and
datasets before the step (often about a second of training) starts. This server
imports a preload list once (third-party modules only, never the lab's own code, so
code edits are never stale) and then, per request over a Unix socket, forks a child
that becomes the step worker (``resources.remote.fork_child``): still one isolated,
disposable process per step, but it starts in a fraction of a second.

Rules (the client side is ``resources.compute.local.warm_server``):

- One server per (python executable, preload list, version) key; several run
  processes on the machine share it. It listens on ``<dir>/<key>.sock``
  (``SOCK_SEQPACKET``, in a 0700 directory) and serves only peers of its own uid
  (``SO_PEERCRED``). The socket appears, by rename, only once the preload is done.
- A ``run`` request carries the step's argv, cwd, environment and scratch dir, with
  the write end of the requester's output pipe as an ``SCM_RIGHTS`` fd. The reply is
  ``{"pid": N}``; when the child is reaped the server sends ``{"exit": code}`` (a
  negative code is the signal that killed it) on the same connection.
- A request may name the ``module`` whose ``main(argv)`` the child runs (default:
  the step worker), and may be ``detached``: then the server closes the connection
  after the reply and the child outlives its requester (a Dagster run worker, which
  the run launcher that asked for it does not wait on; see
  ``lab_assets.orchestration.run_launcher``).
- The connection stays open for the step's life. When the requester closes it or
  dies, the child ends its process group (``fork_child``), and once both the child
  is reaped and the requester is gone the server deletes the step's scratch dir
  (unless asked to keep it): a SIGKILLed run process leaves no scratch behind.
- Single-threaded (``selectors`` + a SIGCHLD wakeup fd) and it never runs torch ops,
  so no Python thread or torch thread pool exists when it forks.
- It exits after ``--idle-timeout`` seconds without a connection or a live step
  (a new server waits at least ``FIRST_CONNECTION_GRACE_S`` for its first), on a
  ``stop`` request, or on SIGTERM: it unlinks its socket (if still its own), then
  serves the connections already queued and the steps still running, then exits,
  so a client whose ``connect`` succeeded is always answered.

Standard library only at import (the preload list is imported at start-up).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from resources.remote import fork_child

MAX_MESSAGE = 1 << 20  # bytes; a request is JSON (argv, cwd, env, scratch)
FIRST_CONNECTION_GRACE_S = 30.0  # a new server waits at least this long for its first client
SCRATCH_MARKER = "step_run_ref.pkl"  # only a step's scratch dir (it holds this) is deleted


@dataclass
class Job:
    conn: socket.socket
    pid: int
    scratch: str | None
    keep_scratch: bool
    exit_code: int | None = None
    requester_gone: bool = False


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} fork_server[{os.getpid()}] {message}", file=sys.stderr, flush=True)


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def send_message(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode())


class Server:
    def __init__(self, path: str, idle_timeout_s: float):
        self.path = path
        self.idle_timeout_s = idle_timeout_s
        self.jobs: dict[int, Job] = {}
        self.stopping = False
        self.base_path = list(sys.path[1:])  # sys.path[0] is the start-up cwd (-m)
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._wake_r, self._wake_w = socket.socketpair()
        self._inode: int | None = None

    def bind(self) -> None:
        """Listen at a temporary name, then rename it into place: clients never see a
        socket that is not ready."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        if os.path.exists(tmp):
            os.unlink(tmp)
        self.listener.bind(tmp)
        os.chmod(tmp, 0o600)
        self.listener.listen(64)
        self._inode = os.stat(tmp).st_ino
        os.rename(tmp, self.path)
        self.sel.register(self.listener, selectors.EVENT_READ)
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ)
        signal.set_wakeup_fd(self._wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _on_term(self, *_: object) -> None:
        self.stopping = True

    def serve(self) -> None:
        """Serve until idle (or stopped); then unlink the socket, serve what was already
        queued on it and the steps still running, and return."""
        idle_since = time.monotonic()
        first_wait = max(self.idle_timeout_s, FIRST_CONNECTION_GRACE_S)
        served = False
        while True:
            idle_for = time.monotonic() - idle_since
            limit = self.idle_timeout_s if served else first_wait
            if self._inode is not None and (self.stopping or (not self.jobs and idle_for >= limit)):
                log("stopping" if self.stopping else f"idle for {idle_for:.1f} s; exiting")
                self._unlink()
            if self._inode is None:
                timeout = None if self.jobs else 0
            else:
                timeout = None if self.jobs else limit - idle_for
            events = self.sel.select(timeout)
            if self._inode is None and not events and not self.jobs:
                return
            for key, _ in events:
                if key.fileobj is self.listener:
                    served = True
                    self._accept()
                elif key.fileobj is self._wake_r:
                    self._drain_wakeups()
                else:
                    self._requester_event(key.data)
            self._reap()
            if self.jobs or any(key.fileobj is self.listener for key, _ in events):
                idle_since = time.monotonic()

    def _unlink(self) -> None:
        """Unlink the socket if it is still ours: no new connection can reach us after."""
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        self._inode = None

    def close(self) -> None:
        self._unlink()
        self.listener.close()
        for job in self.jobs.values():
            job.conn.close()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.settimeout(30)
        fds: list[int] = []
        try:
            _, uid, _ = peer_credentials(conn)
            if uid != os.getuid():
                log(f"refused a connection from uid {uid}")
                conn.close()
                return
            data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 1)
            request = json.loads(data)
            op = request.get("op")
            if op == "run" and len(fds) == 1:
                self._fork(conn, request, fds.pop())
                return
            if op in ("ping", "stop"):
                send_message(conn, {"pid": os.getpid(), "jobs": len(self.jobs)})
                self.stopping = self.stopping or op == "stop"
            else:
                send_message(conn, {"error": f"bad request {op!r} with {len(fds)} fds"})
        except (OSError, ValueError) as e:
            log(f"dropped a request: {e!r}")
        for fd in fds:
            os.close(fd)
        conn.close()

    def _fork(self, conn: socket.socket, request: dict, out_fd: int) -> None:
        if threading.active_count() > 1:
            log(f"warning: {threading.active_count()} Python threads alive at fork")
        close_fds = [self.listener.fileno(), self._wake_r.fileno(), self._wake_w.fileno()]
        close_fds += [job.conn.fileno() for job in self.jobs.values()]
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            fork_child.become_worker(conn, request, out_fd, close_fds, self.base_path)
        os.close(out_fd)
        job = Job(conn, pid, request.get("scratch"), bool(request.get("keep_scratch")))
        self.jobs[pid] = job
        log(f"forked worker {pid} for {request.get('label', '?')}")
        try:
            send_message(conn, {"pid": pid})
        except OSError:
            pass  # the requester is gone: its end is closed, which the child notices too
        if request.get("detached"):
            job.requester_gone = True  # nobody waits on it: it is reaped, nothing more
            conn.close()
        else:
            self.sel.register(conn, selectors.EVENT_READ, job)

    def _requester_event(self, job: Job) -> None:
        try:
            data = job.conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # requesters send nothing after the request; ignore
        job.requester_gone = True
        self.sel.unregister(job.conn)
        self._maybe_finish(job)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.jobs.get(pid)
            if job is None:
                continue
            job.exit_code = os.waitstatus_to_exitcode(status)
            log(f"worker {pid} exited with code {job.exit_code}")
            if not job.requester_gone:
                try:
                    send_message(job.conn, {"exit": job.exit_code})
                except OSError:
                    pass
            self._maybe_finish(job)

    def _maybe_finish(self, job: Job) -> None:
        """Once the child is reaped and the requester gone: delete scratch, forget the job."""
        if job.exit_code is None or not job.requester_gone:
            return
        if job.scratch and not job.keep_scratch and (Path(job.scratch) / SCRATCH_MARKER).exists():
            log(f"requester of worker {job.pid} is gone; deleting {job.scratch}")
            shutil.rmtree(job.scratch, ignore_errors=True)
        job.conn.close()
        del self.jobs[job.pid]


def preload(modules: list[str]) -> None:
    start = time.monotonic()
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a missing optional module only costs speed
            log(f"preload of {name} failed: {e!r}")
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []
    log(
        f"preloaded {len(modules)} modules in {time.monotonic() - start:.1f} s; "
        f"{threading.active_count()} Python thread(s), {len(tasks)} OS thread(s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resources.remote.fork_server")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--preload", default="")
    parser.add_argument("--idle-timeout", type=float, default=600.0)
    parser.add_argument("--daemonize", action="store_true", help="fork, print the pid, exit")
    args = parser.parse_args(argv)
    if args.daemonize:
        pid = os.fork()
        if pid:
            print(pid, flush=True)
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 1)
        os.close(devnull)
    preload([m for m in args.preload.split(",") if m])
    server = Server(args.socket, args.idle_timeout)
    server.bind()
    log(f"serving on {args.socket} (idle timeout {args.idle_timeout:g} s)")
    try:
        server.serve()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
