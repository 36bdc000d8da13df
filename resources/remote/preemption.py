"""The step's side of checkpoint-on-preemption: a SIGTERM flag and a clean early exit.

On a GCE VM the agent runs the step worker with ``LAB_PREEMPTIBLE=1`` and a local
``LAB_CHECKPOINT_DIR`` that it mirrors to GCS. When the VM is preempted the agent
sends the worker SIGTERM; with ``install()`` in effect that only raises a flag,
so training code can finish its current step, write a checkpoint and call
``exit_after_checkpoint()``, which ends the worker without reporting the step as
failed (the launcher starts a new VM and the step resumes from that checkpoint).
Code that never looks at the flag is killed after the agent's grace period and
resumes from its last periodic checkpoint instead. Standard library only (plus
Dagster's interrupt module, patched by ``install``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from resources.remote.protocol import CHECKPOINT_DIR_ENV, PREEMPTED_EXIT_CODE, PREEMPTIBLE_ENV

_requested = threading.Event()


def checkpoint_dir() -> Path | None:
    """The directory to checkpoint into when running under the GCE agent, else None."""
    v = os.environ.get(CHECKPOINT_DIR_ENV)
    return Path(v) if v else None


def install() -> None:
    """Turn SIGTERM into a flag for the rest of this process (main thread only).

    Dagster maps SIGTERM onto its SIGINT handler whenever it enters or leaves an
    interrupt context (``dagster._utils.interrupts.setup_interrupt_handlers``), so
    during the step's own code SIGTERM would raise ``DagsterExecutionInterruptedError``
    and report the step as failed. On a spot VM SIGTERM means "checkpoint and
    stop", so that mapping is switched off in the worker; SIGINT still interrupts.
    """
    from dagster._utils import interrupts

    interrupts.setup_interrupt_handlers = lambda: None
    signal.signal(signal.SIGTERM, lambda *_: _requested.set())


def install_if_preemptible() -> bool:
    if os.environ.get(PREEMPTIBLE_ENV) == "1":
        install()
        return True
    return False


def requested() -> bool:
    """True once the VM is being preempted: checkpoint now and call `exit_after_checkpoint`."""
    return _requested.is_set()


def request() -> None:
    """Set the flag by hand (tests, or code that learns of the preemption another way)."""
    _requested.set()


def exit_after_checkpoint() -> NoReturn:
    """End the worker at once, reporting nothing: the step resumes on another VM."""
    print("checkpoint written; stopping for the preemption", flush=True)
    sys.stderr.flush()
    os._exit(PREEMPTED_EXIT_CODE)
