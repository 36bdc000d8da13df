"""`lab materialize | sweep | reconcile | validate`: an experiment's partitions through Dagster.

- `materialize`: every partition of an experiment, with a progress bar (the README's
  main command).
- `sweep [--dry-run]`: exactly the missing or stale partitions, with the reason for each.
- `reconcile`: record what storage holds in this Dagster instance.
- `validate`: check an experiment file and list its partitions.
"""

from __future__ import annotations

import argparse
import json
import sys

from lab_assets.cli.common import add_command, add_experiment
from lab_assets.experiment.load import load_experiment
from lab_assets.orchestration.instance import ensure_dagster_home


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "materialize",
        purpose="Materialise every partition of an experiment, as Dagster runs on $DAGSTER_HOME.",
        help="materialise every partition of an experiment",
        examples=["lab materialize --experiment experiments/tiny.yaml"],
        fn=_cmd_materialize,
    )
    add_experiment(p)
    p = add_command(
        subparsers,
        "sweep",
        purpose="Materialise exactly the missing or stale partitions, saying why each runs.",
        help="materialise exactly the missing or stale partitions",
        examples=[
            "lab sweep --experiment experiments/tiny.yaml --dry-run",
            "lab sweep --experiment experiments/tiny.yaml",
        ],
        fn=_cmd_sweep,
    )
    add_experiment(p)
    p.add_argument("--dry-run", action="store_true", help="say what would run, and why")
    p.add_argument(
        "--no-reconcile", action="store_true", help="skip recording storage's partitions"
    )
    p = add_command(
        subparsers,
        "reconcile",
        purpose="Record the partitions storage holds in this Dagster instance.",
        help="record partitions storage holds in this Dagster instance",
        examples=["lab reconcile --experiment experiments/tiny.yaml"],
        fn=_cmd_reconcile,
    )
    add_experiment(p)
    p = add_command(
        subparsers,
        "validate",
        purpose="Validate an experiment file and list its base models, runs and adapters.",
        help="validate an experiment file and list its partitions",
        examples=["lab validate --experiment experiments/tiny.yaml"],
        fn=_cmd_validate,
    )
    add_experiment(p)


def _cmd_validate(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment)
    print(f"{exp.path}: valid")
    print(f"  experiment   {exp.name}")
    print(f"  storage      {exp.storage_root}")
    print(f"  compute      {exp.file.compute.kind}")
    print(f"  base models  {', '.join(exp.model_ids)}")
    print(f"  runs         {len(exp.runs)}: {', '.join(exp.run_ids)}")
    print(f"  adapters     {len(exp.runs) * len(exp.model_ids)} partitions (model × run)")
    return 0


def _cmd_materialize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    exp = load_experiment(args.experiment)
    home = ensure_dagster_home()
    from dagster import DagsterInstance

    from lab_assets.orchestration.runner import (
        RunFailed,
        materialize_experiment,
        plan_experiment,
    )

    total = len(plan_experiment(exp))
    print(f"experiment {exp.name}: {total} runs into {exp.storage_root} (DAGSTER_HOME={home})")
    with DagsterInstance.get() as instance, tqdm(total=total, unit="run") as bar:

        def progress(outcome) -> None:
            bar.set_postfix_str(f"{outcome.planned.label} {outcome.seconds:.1f}s")
            bar.update(1)

        try:
            summary = materialize_experiment(exp, instance, on_progress=progress)
        except RunFailed as e:
            bar.close()
            print(f"\nFAILED: {e}", file=sys.stderr)
            return 1
    print(f"materialised {len(summary.outcomes)} runs in {summary.seconds:.1f} s wall time")
    _print_classification(exp)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    exp = load_experiment(args.experiment)
    home = ensure_dagster_home()
    from dagster import DagsterInstance

    from lab_assets.orchestration.instance import set_gpu_pool_limit
    from lab_assets.orchestration.runner import RunFailed, run_planned
    from lab_assets.orchestration.sweep import assess, plan_sweep, reconcile
    from resources.storage.open import open_store

    store = open_store(exp.storage_root, exp.name)
    with DagsterInstance.get() as instance:
        if not args.no_reconcile:
            recorded = reconcile(exp, instance, store)
            if recorded:
                print(f"reconciled {len(recorded)} partitions from storage into {home}")
        plan = plan_sweep(exp, assess(exp, instance, store))
        if not plan:
            print(f"experiment {exp.name}: nothing missing or stale; no runs launched")
            return 0
        print(f"experiment {exp.name}: {len(plan)} runs to launch")
        for p in plan:
            print(f"  {p.label}\n      why: {p.reason}")
        if args.dry_run:
            return 0
        set_gpu_pool_limit(instance, exp)
        with tqdm(total=len(plan), unit="run") as bar:
            for p in plan:
                try:
                    outcome = run_planned(instance, exp, p)
                except RunFailed as e:
                    bar.close()
                    print(f"\nFAILED: {e}", file=sys.stderr)
                    return 1
                bar.set_postfix_str(f"{p.label} {outcome.seconds:.1f}s")
                bar.update(1)
    _print_classification(exp)
    return 0


def _cmd_reconcile(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment)
    home = ensure_dagster_home()
    from dagster import DagsterInstance

    from lab_assets.orchestration.sweep import reconcile
    from resources.storage.open import open_store

    with DagsterInstance.get() as instance:
        recorded = reconcile(exp, instance, open_store(exp.storage_root, exp.name))
    print(f"recorded {len(recorded)} partitions from {exp.storage_root} into {home}")
    for r in recorded:
        print(f"  {r}")
    return 0


def _print_classification(exp) -> None:
    from resources.storage.open import open_store

    store = open_store(exp.storage_root, exp.name)
    if not store.is_complete("classification_results", None):
        return
    results = json.loads(
        (store.local_path("classification_results", None) / "results.json").read_text()
    )
    for target, r in results.items():
        ci = f" (95% CI {r['ci_low']:.2f}-{r['ci_high']:.2f})" if "ci_low" in r else ""
        p = f", permutation p={r['p_value']:.3f}" if "p_value" in r else ""
        print(f"  {target:7s} accuracy {r['accuracy']:.3f}{ci} vs chance {r['chance']:.3f}{p}")
