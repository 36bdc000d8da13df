"""The worker side of the launcher tests' liveness handshake.

A step logs "waiting for ack" and blocks until the test, watching the *host* run's
event log, creates `<handshake_dir>/ack`. Only a launcher that relays events while
the step is still running lets it finish.
"""

import time
from pathlib import Path


def wait_for_ack(context, handshake_dir: str, timeout_s: float = 30) -> None:
    context.log.info("waiting for ack")
    ack = Path(handshake_dir) / "ack"
    deadline = time.time() + timeout_s
    while not ack.exists():
        if time.time() > deadline:
            raise TimeoutError("the launcher never relayed 'waiting for ack' while running")
        time.sleep(0.05)
