"""How long a local step takes to start: cold subprocess worker vs warm (forked) worker.

Runs the torch-importing test code location's trivial step (``mode: torch``: import
torch, train a 4-input linear model for 20 steps) through the real local launcher,
a few times each way, in a temporary Dagster instance, storage and socket dir, and
prints one ``key=value`` line per figure (medians):

- ``cold_start_s`` / ``warm_start_s``: from the launcher's "launching" log entry to
  the first event the worker wrote (its imports, unpickling the step, building the
  job's resources); warm is measured after one warm-up step started the server.
- ``cold_step_s`` / ``warm_step_s``: from "launching" to the step's success event
  (adds importing torch in the step, a no-op when the server preloaded it, and the
  training itself).
- ``server_start_s``: the warm-up step, which includes starting the server.

Usage: ``.venv/bin/python benchmarks/step_start.py [--repeats N]``. The machine's
load changes the figures; compare both ways within one invocation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _timings(instance, run_id: str) -> tuple[float, float]:
    """(start, step) seconds of one run, from its event log's timestamps."""
    logs = instance.all_logs(run_id)
    launch = next(e for e in logs if (e.user_message or "").startswith("launching remote_work"))
    after = [e for e in logs if e.timestamp >= launch.timestamp and e is not launch]
    launcher_lines = ("remote_work runs in", "[worker]", "warm worker server unavailable")
    first = next(e for e in after if not (e.user_message or "").startswith(launcher_lines))
    done = next(e for e in after if e.is_dagster_event and e.dagster_event.is_step_success)
    return first.timestamp - launch.timestamp, done.timestamp - launch.timestamp


def _run_once(instance) -> tuple[float, float]:
    from dagster import execute_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    repo = ReconstructableRepository.for_module(
        "lab_assets_tests.code_locations.launcher_defs", "defs", working_directory=str(ROOT)
    )
    job = repo.get_reconstructable_job("__ASSET_JOB")
    cfg = {"ops": {"remote_work": {"config": {"mode": "torch", "handshake_dir": ""}}}}
    with execute_job(job, instance=instance, run_config=cfg, raise_on_error=True) as result:
        return _timings(instance, result.run_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-", dir="/tmp"))
    for name in ("storage", "scratch", "home", "sock"):
        (tmp / name).mkdir(mode=0o700)
    os.environ.update(
        LAB_STORAGE_ROOT=str(tmp / "storage"),
        LAB_SCRATCH_ROOT=str(tmp / "scratch"),
        DAGSTER_HOME=str(tmp / "home"),
        LAB_WARM_SOCKET_DIR=str(tmp / "sock"),
    )
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    from dagster import DagsterInstance

    from resources.compute.local.warm_server import stop_servers

    try:
        with DagsterInstance.get() as instance:
            os.environ["LAB_WARM_WORKERS"] = "0"
            cold = [_run_once(instance) for _ in range(args.repeats)]
            os.environ["LAB_WARM_WORKERS"] = "1"
            warm_up = _run_once(instance)
            warm = [_run_once(instance) for _ in range(args.repeats)]
    finally:
        stop_servers(tmp / "sock")
    print(f"cpus={len(os.sched_getaffinity(0))}")
    print(f"repeats={args.repeats}")
    print(f"cold_start_s={statistics.median(s for s, _ in cold):.3f}")
    print(f"warm_start_s={statistics.median(s for s, _ in warm):.3f}")
    print(f"cold_step_s={statistics.median(t for _, t in cold):.3f}")
    print(f"warm_step_s={statistics.median(t for _, t in warm):.3f}")
    print(f"server_start_s={warm_up[1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
