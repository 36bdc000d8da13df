"""Runs one Dagster step from its pickled run reference, outside the plan process.

The step launchers start this module (in a local subprocess, or on a VM through
the agent). It executes the step with the job's own resources (so the same IO
manager reads inputs and writes outputs) and appends every Dagster event to an
events file, one serialized `EventLogEntry` a line, flushed as it happens, so the
launcher can relay events into the run while the step is still running.

Locally it runs either as ``python -m resources.remote.step_worker`` (a cold
subprocess) or as ``main`` called in a child forked by the warm worker server
(``resources.remote.fork_server``), which has torch & co already imported. Either
way ``$LAB_TORCH_THREADS`` caps torch's CPU threads, so parallel workers do not
oversubscribe the cores.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from pathlib import Path

from dagster._core.events.log import EventLogEntry
from dagster._core.execution.plan.external_step import (
    external_instance_from_step_run_ref,
    run_step_from_ref,
)
from dagster._serdes import serialize_value

from resources.remote import preemption
from resources.remote.protocol import TORCH_THREADS_ENV


def limit_torch_threads() -> int | None:
    """Apply ``$LAB_TORCH_THREADS``: to torch if it is imported already (a forked warm
    worker), else through the OpenMP/MKL variables torch reads when it is imported."""
    value = os.environ.get(TORCH_THREADS_ENV, "").strip()
    if not value:
        return None
    n = max(1, int(value))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


_ended_by: list[str] = []  # the signal that interrupted the step, once one has


def name_termination_signals() -> None:
    """Say which signal interrupted the step: Dagster turns SIGTERM into a bare
    `DagsterExecutionInterruptedError`, whose failure would otherwise not say that a
    signal ended the worker, nor which. (Main thread only; not under preemption, where
    SIGTERM means "checkpoint and stop" instead.)"""
    from dagster._core.errors import DagsterExecutionInterruptedError
    from dagster._utils import interrupts

    def on_signal(signo, frame):
        name = signal.Signals(signo).name
        if not _ended_by:
            _ended_by.append(name)
        print(f"step worker: received {name}; interrupting the step", file=sys.stderr, flush=True)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signo, frame)
        else:
            raise KeyboardInterrupt

    def setup() -> None:  # Dagster calls this whenever it swaps its SIGINT handler
        signal.signal(signal.SIGTERM, on_signal)

    plain_str = DagsterExecutionInterruptedError.__str__

    def described(self) -> str:
        text = plain_str(self)
        return text or (f"step worker ended by {_ended_by[0]}" if _ended_by else text)

    DagsterExecutionInterruptedError.__str__ = described
    interrupts.setup_interrupt_handlers = setup
    setup()


def run_step(step_run_ref_path: str | Path, events_path: str | Path) -> None:
    """Execute the referenced step; every event is appended to `events_path` as it happens."""
    # On a spot VM (the GCE agent sets LAB_PREEMPTIBLE=1) SIGTERM becomes a flag that
    # training code checks to checkpoint and stop (resources/remote/preemption.py).
    if not preemption.install_if_preemptible():
        name_termination_signals()
    limit_torch_threads()
    with open(step_run_ref_path, "rb") as f:
        step_run_ref = pickle.load(f)
    with open(events_path, "a", encoding="utf-8") as out:

        def relay(entry: EventLogEntry) -> None:
            out.write(serialize_value(entry) + "\n")
            out.flush()

        instance = external_instance_from_step_run_ref(step_run_ref, event_listener_fn=relay)
        for _ in run_step_from_ref(step_run_ref, instance):
            pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(
            "usage: python -m resources.remote.step_worker STEP_RUN_REF.pkl EVENTS.jsonl",
            file=sys.stderr,
        )
        return 2
    run_step(args[0], args[1])
    # Every event is flushed to the events file by now; skip the interpreter's slow
    # teardown of torch & co (seconds per step), which the launcher would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
