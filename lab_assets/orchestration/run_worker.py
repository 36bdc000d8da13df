"""One Dagster run worker: what `dagster api execute_run` does, as a `main(argv)`.

The lab's run launcher (``run_launcher.py``) has the warm worker server fork this
from a process that already has dagster, torch & co imported, so a run starts in a
fraction of a second instead of paying seconds of imports and a code-location load
per partition; where no warm server can be had it runs as
``python -m lab_assets.orchestration.run_worker <args>`` instead. Either way the run
executes exactly as Dagster's own run worker would: the job is rebuilt from the
run's code origin (the lab's code is imported fresh in every worker, so an edit is
never stale), events go to the instance, SIGTERM or SIGINT cancels the run.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """`argv`: one serialized `ExecuteRunArgs`. Returns the worker's exit code."""
    if len(argv) != 1:
        print("usage: python -m lab_assets.orchestration.run_worker <ExecuteRunArgs json>")
        return 2
    from dagster._cli.api import execute_run_command

    # the click command's body, in this process: capture_interrupts, instance from the
    # ref, `core_execute_run` with the job rebuilt from the run's origin
    execute_run_command.callback(input_json=argv[0], compressed_input_json=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
