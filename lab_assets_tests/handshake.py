"""The launcher tests' liveness handshake, both sides.

A step logs "waiting for ack" and blocks until the test, watching the *host* run's
event log, creates `<handshake_dir>/ack`. Only a launcher that relays events while
the step is still running lets it finish.
"""

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dagster import DagsterInstance


def wait_for_ack(context, handshake_dir: str, timeout_s: float = 30) -> None:
    context.log.info("waiting for ack")
    ack = Path(handshake_dir) / "ack"
    deadline = time.time() + timeout_s
    while not ack.exists():
        if time.time() > deadline:
            raise TimeoutError("the launcher never relayed 'waiting for ack' while running")
        time.sleep(0.05)


@contextlib.contextmanager
def acknowledge_when_logged(instance, handshake_dir: Path) -> Iterator[None]:
    """The test side: a thread that creates the ack once any run of `instance` has logged
    "waiting for ack"."""
    stop = threading.Event()

    def watch() -> None:
        with DagsterInstance.from_ref(instance.get_ref()) as reader:
            while not stop.is_set():
                for run in reader.get_runs():
                    logs = reader.all_logs(run.run_id)
                    if any("waiting for ack" in (e.user_message or "") for e in logs):
                        (handshake_dir / "ack").touch()
                        return
                time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
