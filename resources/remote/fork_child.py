"""The child side of the warm worker server: turn a fresh fork into one step worker.

The server (``resources.remote.fork_server``) has dagster, torch, transformers & co
imported and forks once per step; this module makes that fork look like the cold
``python -m resources.remote.step_worker`` a launcher would otherwise start: its own
session and process group, the requester's working directory, environment and
import path, stdout/stderr on the pipe the requester passed over the socket, and the
lab's own code imported fresh (the server never imports it, so edits are never
stale). It runs ``step_worker.main`` (or the requested module's ``main``: a Dagster
run worker, say) and ends with ``os._exit``.

The child's parent is the server, not the run process, so PDEATHSIG cannot tie it to
the run. Instead a thread watches the requester's end of the connection: when the
run process closes it or dies (the kernel closes it), the child terminates its
whole process group. Standard library only at import.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
import threading
import time
import traceback

# seconds between SIGTERM and SIGKILL of the process group once the requester is gone
KILL_GRACE_S = 5.0
DEFAULT_MODULE = "resources.remote.step_worker"  # whose main(argv) a child runs


def become_worker(
    conn: socket.socket, request: dict, out_fd: int, close_fds: list[int], base_path: list[str]
) -> None:
    """In the forked child: set up, run the step, and ``os._exit`` with its code. Never returns."""
    code = 1
    try:
        _detach(close_fds, out_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = [request["cwd"], *base_path]
        module = request.get("module") or DEFAULT_MODULE
        sys.argv = [module, *request["argv"]]
        _name_process("lab-step-worker" if module == DEFAULT_MODULE else "lab-run-worker")
        if request.get("detached"):
            conn.close()  # nobody waits on a detached worker: it lives until it is done
        else:
            conn.setblocking(True)
            threading.Thread(target=_die_with_requester, args=(conn,), daemon=True).start()
        result = importlib.import_module(module).main(list(request["argv"]))
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the worker reports whatever killed it, then exits
        traceback.print_exc()
        code = 1
    finally:
        _flush()
        os._exit(code)


def _detach(close_fds: list[int], out_fd: int) -> None:
    """New session, the server's signal handling undone, fds 0/1/2 rewired."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    # the server's sys.stdout/err were made for /dev/null (block-buffered): line-buffer them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass


def _name_process(name: str) -> None:
    """What `ps`/`top` show for this fork (its cmdline stays the server's)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def _die_with_requester(conn: socket.socket) -> None:
    """Block until the requester's end closes (it sends nothing more), then end the group."""
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass
    _flush()
    try:
        os.killpg(0, signal.SIGTERM)
        time.sleep(KILL_GRACE_S)
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(143)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
