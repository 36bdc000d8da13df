"""A backfill with a live progress bar: what `lab materialize`, `sweep` and `launch` show.

The bar counts asset partitions (materialised or failed of those targeted); beside it,
how many runs are running and queued, and each running partition's latest training
line (`step k/N loss x`). Ctrl-C cancels the backfill and says what it stopped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from dagster import DagsterInstance
from tqdm import tqdm

from lab_assets.experiment.resolved import Experiment
from lab_assets.orchestration.backfill import AssetPartition
from lab_assets.orchestration.engine import interrupts_as_flag, run_backfill
from lab_assets.orchestration.recovery import settle
from lab_assets.orchestration.watch import IN_PROGRESS, run_failures


def settle_leftovers(instance: DagsterInstance, store) -> bool:
    """Settle what `lab` processes that died left behind (dead runs, an orphaned
    backfill, scratch directories); False if Ctrl-C stopped the wait for its runs."""
    with interrupts_as_flag() as stop:
        settled = settle(instance, store, on_event=lambda m: print(f"recovery: {m}"), stop=stop)
    if settled.still_running:
        print(
            "stopped waiting; still running (they finish on their own): "
            + ", ".join(settled.still_running),
            file=sys.stderr,
        )
        return False
    return True


def backfill_with_progress(
    instance: DagsterInstance,
    exp: Experiment,
    targets: list[AssetPartition],
    title: str,
    run_config: dict | None = None,
    on_submitted: Callable[[str], None] | None = None,
) -> int:
    """Run one backfill with a live progress bar; 0 if every partition was materialised."""
    with tqdm(total=len(targets), unit="partition", mininterval=1.0) as bar:
        shown: list[str] = [""]

        def show(p) -> None:
            if bar.n != p.done + p.failed:
                bar.update(p.done + p.failed - bar.n)
            running = ", ".join(f"{k} {v}" for k, v in sorted(p.running.items())[:3])
            queued = sum(1 for r in p.runs if r.status.value == "QUEUED")
            postfix = f"running {len(p.running)} queued {queued} failed {p.failed}" + (
                f" | {running}" if running else ""
            )
            if postfix != shown[0]:
                shown[0] = postfix
                bar.set_postfix_str(postfix)

        result = run_backfill(
            instance,
            exp,
            targets,
            title,
            show,
            on_event=bar.write,
            run_config=run_config,
            on_submitted=on_submitted,
        )
    p = result.progress
    print(
        f"backfill {result.backfill_id}: {p.done}/{p.total} asset partitions materialised, "
        f"{p.failed} failed, {len(p.runs)} runs, {result.seconds:.1f} s wall time"
    )
    if result.canceled is not None:
        queued, running = result.canceled
        left = [r.run_id for r in p.runs if r.status in IN_PROGRESS]
        print(
            f"canceled: {queued} queued runs canceled, {running} running runs terminated; "
            + (f"still in progress: {', '.join(left)}" if left else "nothing is left running"),
            file=sys.stderr,
        )
        return 130
    if not result.ok:
        for run in p.runs:
            for line in run_failures(instance, run):
                print(f"FAILED run {run.run_id}: {line}", file=sys.stderr)
        return 1
    return 0
