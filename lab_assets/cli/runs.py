"""`lab materialize | sweep | reconcile | validate`: an experiment's partitions through Dagster.

- `materialize`: every partition of an experiment, with a progress bar (the README's
  main command).
- `sweep [--dry-run] [--verify [cheap|full]]`: exactly the missing, stale or corrupt
  partitions, with the reason for each.
- `reconcile`: record what storage holds in this Dagster instance.
- `validate`: check an experiment file and list its partitions.
"""

from __future__ import annotations

import argparse
import json

from lab_assets.cli.common import add_command, add_experiment, check_storage
from lab_assets.cli.progress import backfill_with_progress, settle_leftovers
from lab_assets.experiment.load import load_experiment
from lab_assets.experiment.schema import ExperimentError
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
        purpose=(
            "Materialise exactly the missing, stale or corrupt partitions, saying why each runs."
        ),
        help="materialise exactly the missing, stale or corrupt partitions",
        examples=[
            "lab sweep --experiment experiments/tiny.yaml --dry-run",
            "lab sweep --experiment experiments/tiny.yaml --dry-run --verify",
            "lab sweep --experiment experiments/tiny.yaml",
        ],
        fn=_cmd_sweep,
    )
    add_experiment(p)
    p.add_argument("--dry-run", action="store_true", help="say what would run, and why")
    p.add_argument(
        "--verify",
        nargs="?",
        const="full",
        default="cheap",
        choices=["cheap", "full"],
        help=(
            "how stored files are checked against their manifests: 'cheap' (default: "
            "file list and sizes, stray files) or 'full' (also every file's sha256, "
            "reading every byte; plain --verify means full)"
        ),
    )
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
    if exp.placeholders:  # nothing real to probe yet: say what to set instead
        storage = f"{exp.storage_root} (not probed: set {', '.join(exp.placeholders)} first)"
    else:
        check_storage(exp)
        storage = f"{exp.storage_root} (writable: a probe was written and deleted)"
    home = ensure_dagster_home()
    print(f"{exp.path}: valid")
    print(f"  experiment   {exp.name}")
    print(f"  storage      {storage}")
    print(f"  compute      {exp.file.compute.kind}")
    print(f"  base models  {', '.join(exp.model_ids)}")
    print(f"  runs         {len(exp.runs)}: {', '.join(exp.run_ids)}")
    print(f"  adapters     {len(exp.runs) * len(exp.model_ids)} partitions (model × run)")
    print(f"  instance     {home} (DAGSTER_HOME)")
    return 0


def _cmd_materialize(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment)
    check_storage(exp)
    home = ensure_dagster_home()
    from dagster import DagsterInstance

    from lab_assets.orchestration.backfill import every_partition
    from lab_assets.orchestration.sweep import key_style_error
    from resources.storage.open import open_store

    targets = every_partition(exp)
    print(f"experiment {exp.name}: {len(targets)} asset partitions into {exp.storage_root}")
    print(f"  Dagster instance {home} (`dagster dev` there shows the backfill and its runs)")
    with DagsterInstance.get() as instance:
        if why := key_style_error(exp, instance):
            raise ExperimentError(why)
        if not settle_leftovers(instance, open_store(exp.storage_root, exp.name)):
            return 130
        code = backfill_with_progress(instance, exp, targets, f"lab materialize: {exp.name}")
    if code == 0:
        _print_classification(exp)
    return code


def _cmd_sweep(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment)
    if not args.dry_run:  # a dry run only reads storage
        check_storage(exp)
    home = ensure_dagster_home()
    from dagster import DagsterInstance

    from lab_assets.orchestration.sweep import (
        FRESH,
        assess,
        in_flight,
        key_style_error,
        plan_sweep,
        reconcile,
        sweep_lock,
        sweep_targets,
    )
    from resources.storage.open import open_store

    store = open_store(exp.storage_root, exp.name)
    lock = sweep_lock(home)  # held from planning until the backfill is written
    with lock, DagsterInstance.get() as instance:
        lock.across_machines(instance)
        if why := key_style_error(exp, instance):
            raise ExperimentError(why)
        if not args.dry_run and not settle_leftovers(instance, store):
            return 130
        if not args.no_reconcile:
            recorded = reconcile(exp, instance, store)
            if recorded:
                print(f"reconciled {len(recorded)} partitions from storage into {home}")
        statuses = assess(exp, instance, store, verify=args.verify)
        busy = in_flight(instance, exp.asset_prefix)
        coming = [st for st in statuses if st.state != FRESH and (st.asset, st.partition) in busy]
        for st in coming:
            where = f"[{st.partition}]" if st.partition else ""
            print(f"  already being rebuilt: {st.asset}{where} ({busy[(st.asset, st.partition)]})")
        statuses = [st for st in statuses if (st.asset, st.partition) not in busy]
        plan = plan_sweep(exp, statuses)
        if not plan and coming:
            print(f"experiment {exp.name}: nothing else to launch; no runs launched")
            return 0
        if not plan:
            checked = (
                "sha256-checked"
                if args.verify == "full"
                else "checked by file list and size; --verify also checks sha256"
            )
            print(
                f"experiment {exp.name}: nothing missing or stale; no runs launched "
                f"(stored files {checked})"
            )
            return 0
        print(f"experiment {exp.name}: {len(plan)} runs to launch")
        for p in plan:
            print(f"  {p.label}\n      why: {p.reason}")
        if args.dry_run:
            return 0
        code = backfill_with_progress(
            instance,
            exp,
            sweep_targets(statuses),
            f"lab sweep: {exp.name}",
            on_submitted=lambda _id: lock.release(),
        )
    if code == 0:
        _print_classification(exp)
    return code


def _cmd_reconcile(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment)
    home = ensure_dagster_home()
    from dagster import DagsterInstance

    from lab_assets.orchestration.sweep import key_style_error, reconcile
    from resources.storage.open import open_store

    with DagsterInstance.get() as instance:
        if why := key_style_error(exp, instance):
            raise ExperimentError(why)
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
    print_results(results)


def _acc(r: dict) -> str:
    if "accuracy" not in r:
        return f"n/a ({r.get('error', 'not run')})"
    return (
        f"{r['accuracy']:.3f} (95% CI {r['ci_low']:.2f}-{r['ci_high']:.2f}, p={r['p_value']:.3f})"
    )


def print_results(results: dict) -> None:
    """The headline (scale-free features), its controls and the control arms, as text."""
    if "feature_sets" not in results:  # results of the code before controls existed
        for target, r in results.items():
            print(f"  {target:7s} accuracy {_acc(r)} vs chance {r['chance']:.3f}")
        return
    print(
        f"  headline: {results['headline_feature_set']} features; p-value floor "
        f"{results['p_value_floor']:.4f} ({results['n_permutations']} permutations)"
    )
    for target in ("method", "task"):
        r, sets = results[target], results["feature_sets"][target]
        print(f"  {target:7s} accuracy {_acc(r)} vs chance {r['chance']:.3f}")
        for name in ("all", "norm_only", "random_delta"):
            print(f"    control {name:13s} {_acc(sets[name])}")
        print(f"    {results['verdicts'][target]['statement']}")
        if "at_matched_norm" in results["verdicts"][target]:
            print(f"    {results['verdicts'][target]['at_matched_norm']}")
    for arm, comp in results.get("control_arms", {}).items():
        norms = ", ".join(f"{k} {v:.2f}" for k, v in comp["median_total_fro_norm"].items())
        print(f"  control arm {arm}: {comp['question']} (median ‖ΔW‖_F: {norms})")
        for name, r in comp["feature_sets"].items():
            print(f"    {name:13s} {_acc(r)}")
        if "task_scale_free" in comp:
            print(f"    task among them, scale-free: {_acc(comp['task_scale_free'])}")
