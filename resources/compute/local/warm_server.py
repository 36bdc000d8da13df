"""Finding, starting and talking to the warm worker server from a run process.

The server (``resources.remote.fork_server``) keeps torch & co imported and forks
one step worker per request, so a local step starts in a fraction of a second
instead of paying seconds of imports. It outlives any one run and is shared by
every run process of this user on the machine that uses the same python and
preload list:

- **Where**: ``$LAB_WARM_SOCKET_DIR``, else ``$XDG_RUNTIME_DIR/lab-warm``, else
  ``<tmp>/lab-warm-<uid>``; created 0700 and refused unless it is ours and 0700.
- **Which**: ``<dir>/<key>.sock``, the key a hash of ``sys.executable``, the preload
  list, the server's own source, where ``resources`` lives, ``VERSION`` and the
  environment variables that preloaded libraries read at import. Change any of
  them and a new server is used; the old one idles out.
- **Start**: on first need, under ``flock(<dir>/<key>.lock)`` so concurrent runs
  start one server; detached (own session, stdin/stdout ``/dev/null``, stderr to
  ``<dir>/<key>.log``); the caller waits until it answers a ping.
- **Stop**: by itself after its idle timeout; ``stop_servers`` for tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import resources
from resources.procs import alive
from resources.remote import fork_child, fork_server
from resources.remote.protocol import (
    WARM_IDLE_TIMEOUT_ENV,
    WARM_PRELOAD_ENV,
    WARM_SOCKET_DIR_ENV,
)

VERSION = "1"
DEFAULT_PRELOAD = (
    "dagster",
    "dagster._core.execution.plan.external_step",
    "dagster._core.events.log",
    "dagster._serdes",
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    # what a run worker and the lab's own code use beside them: the instance's
    # storages (a step worker builds an ephemeral one, a run worker the SQLite one)
    "dagster._cli.api",
    "dagster._core.execution.api",
    "dagster._core.instance.factory",
    "dagster._core.storage.sqlite_storage",
    "dagster._core.storage.runs.sqlite",
    "dagster._core.storage.event_log.sqlite",
    "dagster._core.storage.schedules.sqlite",
    "dagster._core.storage.runs.in_memory",
    "dagster._core.storage.event_log.in_memory",
    "dagster._core.storage.local_compute_log_manager",
    "dagster._core.storage.noop_compute_log_manager",
    "dagster._core.launcher.sync_in_memory_run_launcher",
    "dagster._daemon.monitoring",
    "alembic.migration",
    "upath",
    "pandas",
    "pyarrow.parquet",
    "sklearn.ensemble",
    "sklearn.model_selection",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    # each adapter logs to MLflow (resources/tracking.py): ~1 s to import otherwise
    "mlflow.tracking",
    "mlflow.entities",
    "mlflow.store.tracking.sqlalchemy_store",
)
# read by the preloaded libraries when imported, so a server is only right for its own values
_KEY_ENV_PREFIXES = (
    "HF_",
    "TRANSFORMERS_",
    "DATASETS_",
    "TORCH",
    "PYTORCH",
    "PYTHON",
    "XDG_CACHE",
    "MLFLOW_",
)
DEFAULT_START_TIMEOUT_S = 300.0
REPLY_TIMEOUT_S = 60.0


DEFAULT_IDLE_TIMEOUT_S = 600.0


def configured_preload() -> tuple[str, ...]:
    """`$LAB_WARM_PRELOAD` (comma-separated modules), else `DEFAULT_PRELOAD`: the step
    launcher and the run launcher share one server only if they agree on this."""
    env = os.environ.get(WARM_PRELOAD_ENV)
    if env is not None:
        return tuple(m.strip() for m in env.split(",") if m.strip())
    return DEFAULT_PRELOAD


def configured_idle_timeout_s() -> float:
    """`$LAB_WARM_IDLE_TIMEOUT_S`, else `DEFAULT_IDLE_TIMEOUT_S`."""
    return float(os.environ.get(WARM_IDLE_TIMEOUT_ENV) or DEFAULT_IDLE_TIMEOUT_S)


class WarmServerUnavailable(RuntimeError):
    """The warm worker server could not be reached or started; the message says why."""


def socket_dir() -> Path:
    """The per-user directory of servers' sockets, locks and logs (0700, ours)."""
    explicit = os.environ.get(WARM_SOCKET_DIR_ENV)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if explicit:
        path = Path(explicit)
    elif runtime and os.access(runtime, os.W_OK):
        path = Path(runtime) / "lab-warm"
    else:
        path = Path(tempfile.gettempdir()) / f"lab-warm-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WarmServerUnavailable(f"{path} is not a 0700 directory of uid {os.getuid()}")
    return path


def server_key(python: str, preload: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    parts = [VERSION, python, ",".join(preload), str(Path(resources.__file__).parent)]
    parts += [Path(m.__file__).read_text() for m in (fork_server, fork_child)]
    parts += [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(_KEY_ENV_PREFIXES)]
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _connect(path: Path, timeout_s: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
        _, uid, _ = fork_server.peer_credentials(sock)
        if uid != os.getuid():
            raise WarmServerUnavailable(f"{path} is served by uid {uid}, not {os.getuid()}")
    except BaseException:
        sock.close()
        raise
    return sock


def _ask(path: Path, request: dict, fds: tuple[int, ...] = ()) -> tuple[socket.socket, dict]:
    """Connect, send one request (with `fds`), read one reply; the caller closes the socket."""
    sock = _connect(path, REPLY_TIMEOUT_S)
    try:
        socket.send_fds(sock, [json.dumps(request).encode()], list(fds))
        data = sock.recv(fork_server.MAX_MESSAGE)
        if not data:
            raise ConnectionResetError("the server closed the connection without a reply")
        return sock, json.loads(data)
    except BaseException:
        sock.close()
        raise


def ping(path: Path) -> dict:
    """{"pid": server pid, "jobs": live steps}; raises OSError when nobody answers."""
    sock, reply = _ask(path, {"op": "ping"})
    sock.close()
    return reply


@contextlib.contextmanager
def _start_lock(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_server(
    python: str,
    preload: tuple[str, ...],
    idle_timeout_s: float,
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
) -> tuple[Path, int]:
    """The socket path and pid of a server for this key, started if none answers."""
    path, sock, reply = _with_server(
        python, preload, idle_timeout_s, {"op": "ping"}, (), start_timeout_s
    )
    sock.close()
    return path, int(reply["pid"])


def _with_server(
    python: str,
    preload: tuple[str, ...],
    idle_timeout_s: float,
    request: dict,
    fds: tuple[int, ...],
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
) -> tuple[Path, socket.socket, dict]:
    """Send `request` to this key's server, starting one if none answers. The request
    itself is the probe: a server that accepted the connection always answers it."""
    directory = socket_dir()
    key = server_key(python, preload)
    path = directory / f"{key}.sock"
    with contextlib.suppress(OSError):
        return (path, *_ask(path, request, fds))
    with _start_lock(directory / f"{key}.lock"):
        with contextlib.suppress(OSError):
            return (path, *_ask(path, request, fds))  # another run started it meanwhile
        log_path = directory / f"{key}.log"
        pid = _spawn(python, preload, idle_timeout_s, path, log_path)
        deadline = time.monotonic() + start_timeout_s
        while True:
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                return (path, *_ask(path, request, fds))
            if not alive(pid):
                raise WarmServerUnavailable(
                    f"the warm worker server (pid {pid}) died while starting; "
                    f"the end of {log_path}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise WarmServerUnavailable(
                    f"the warm worker server (pid {pid}) did not answer within "
                    f"{start_timeout_s:g} s; see {log_path}"
                )
            time.sleep(0.05)


def _spawn(
    python: str, preload: tuple[str, ...], idle_timeout_s: float, path: Path, log_path: Path
) -> int:
    """Start a detached server; its pid (the launcher's child only forks it and exits)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead server's socket
    args = [python, "-m", "resources.remote.fork_server", "--daemonize", "--socket", str(path)]
    args += ["--preload", ",".join(preload), "--idle-timeout", str(idle_timeout_s)]
    with open(log_path, "a") as log:
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=str(Path(resources.__file__).parent.parent),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            text=True,
            check=False,
            timeout=120,
        )
    if proc.returncode != 0 or not proc.stdout.strip().isdigit():
        raise WarmServerUnavailable(
            f"could not start the warm worker server (exit {proc.returncode}); "
            f"the end of {log_path}:\n{_tail(log_path)}"
        )
    return int(proc.stdout.strip())


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def request_worker(
    python: str, preload: tuple[str, ...], idle_timeout_s: float, request: dict, out_fd: int
) -> tuple[socket.socket, int, int]:
    """Have this key's server (started if need be) fork a worker: the connection (kept
    open for the step's life: closing it ends the worker), the worker's and server's pids."""
    _, sock, reply = _with_server(
        python, preload, idle_timeout_s, {**request, "op": "run"}, (out_fd,)
    )
    if "pid" not in reply:
        sock.close()
        raise WarmServerUnavailable(f"the warm worker server refused: {reply.get('error')}")
    server_pid = fork_server.peer_credentials(sock)[0]
    return sock, int(reply["pid"]), server_pid


def start_detached(
    python: str, preload: tuple[str, ...], idle_timeout_s: float, request: dict, out_fd: int
) -> tuple[int, int]:
    """Have this key's server fork a worker that outlives this call (``detached``):
    the worker's and the server's pids. Its output goes to `out_fd` (a log file)."""
    _, sock, reply = _with_server(
        python, preload, idle_timeout_s, {**request, "op": "run", "detached": True}, (out_fd,)
    )
    try:
        if "pid" not in reply:
            raise WarmServerUnavailable(f"the warm worker server refused: {reply.get('error')}")
        return int(reply["pid"]), fork_server.peer_credentials(sock)[0]
    finally:
        sock.close()


def stop_servers(directory: Path, timeout_s: float = 60.0) -> list[int]:
    """Stop every server with a socket in `directory`; their pids (for tests and tools)."""
    pids = []
    for path in sorted(Path(directory).glob("*.sock")):
        with contextlib.suppress(OSError, ValueError):
            sock, reply = _ask(path, {"op": "stop"})
            sock.close()
            pids.append(int(reply["pid"]))
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
    return pids
