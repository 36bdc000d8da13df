"""`python -m lab_assets.orchestration.daemon_main`: the Dagster daemon that `lab` starts.

It is `dagster-daemon run` with one change: the backfill daemon evaluates every
`LAB_BACKFILL_INTERVAL_S` seconds (default 2) instead of Dagster's fixed 30, so a
backfill moves from base models to adapters to the classification without half a
minute of idling at each level. The constant is read by the backfill loop when it
starts, so setting it before the daemon starts is enough. A daemon started by
`dagster dev` keeps Dagster's default. It also exits when the `lab` process that
started it is gone, however that process ended.
"""

from __future__ import annotations

import os
import sys

INTERVAL_ENV = "LAB_BACKFILL_INTERVAL_S"
PARENT_ENV = "LAB_DAEMON_PARENT_PID"  # the `lab` process this daemon serves


def _exit_with_parent(parent: int) -> None:
    """A daemon `lab` started must not outlive it, even if `lab` is SIGKILLed."""
    import signal
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        try:  # its last heartbeat must not pass for a live daemon to the next `lab`
            from dagster import DagsterInstance

            with DagsterInstance.get() as instance:
                instance.wipe_daemon_heartbeats()
        except Exception:
            pass  # the next `lab` then waits out the heartbeat tolerance and starts its own
        os.killpg(os.getpgrp(), signal.SIGTERM)  # the daemon and its code server

    threading.Thread(target=watch, name="lab-parent-watch", daemon=True).start()


def main() -> None:
    from dagster._daemon import controller
    from dagster._daemon.cli import main as daemon_cli

    if hasattr(controller, "DEFAULT_DAEMON_INTERVAL_SECONDS"):
        controller.DEFAULT_DAEMON_INTERVAL_SECONDS = float(os.environ.get(INTERVAL_ENV) or 2)
    if os.environ.get(PARENT_ENV):
        _exit_with_parent(int(os.environ[PARENT_ENV]))
    sys.argv = ["dagster-daemon", "run", *sys.argv[1:]]
    daemon_cli()


if __name__ == "__main__":
    main()
