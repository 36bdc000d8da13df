"""`lab compare A.yaml B.yaml …`: several experiments' results side by side, from storage.

Reads only what each experiment's storage holds (local or gs://): the classification
results (headline, controls, verdicts) and every adapter's held-out evaluation
(`eval.json` beside its weights). No Dagster instance is opened, so a researcher can
compare experiments that ran on other machines or other instances, after `lab fetch`
or straight from the bucket. Prints two tables and writes one plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from lab_assets.cli.common import add_command
from lab_assets.experiment.load import load_experiment
from lab_assets.experiment.resolved import Experiment
from lab_assets.names import ADAPTER, CLASSIFICATION

CONTROLS = ("norm_only", "random_delta", "all")  # beside the headline feature set
CONTROL_LABELS = {"norm_only": "norm only", "random_delta": "random ΔW", "all": "all features"}
EVAL_FILE = "eval.json"
RESULTS_FILE = "results.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "compare",
        purpose=(
            "Compare experiments' headline results, controls and per-adapter held-out "
            "metrics, read from their storage (no Dagster instance needed)."
        ),
        help="compare experiments' results from storage",
        examples=[
            "lab compare experiments/tiny.yaml experiments/other.yaml",
            "lab compare experiments/*.yaml --plot results/compare.png",
        ],
        fn=_cmd_compare,
    )
    p.add_argument("experiments", nargs="+", type=Path, help="experiment files (YAML)")
    p.add_argument(
        "--plot",
        type=Path,
        default=Path("results") / "compare.png",
        help="where to write the plot (default: results/compare.png)",
    )


@dataclass
class Compared:
    exp: Experiment
    results: dict[str, Any] | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    missing_adapters: int = 0


def _read_file(store, asset: str, partition: str | None, name: str) -> dict | None:
    """One JSON file of a stored partition (downloading only that file from GCS)."""
    if store.read_manifest(asset, partition) is None:
        return None
    if hasattr(store, "download"):  # GCS: not the whole (multi-GB) adapter
        with tempfile.TemporaryDirectory(prefix="lab-compare-") as tmp:
            try:
                store.download(asset, partition, Path(tmp), only=[name])
            except Exception:
                return None
            p = Path(tmp) / name
            return json.loads(p.read_text()) if p.is_file() else None
    p = store.verified_path(asset, partition) / name
    return json.loads(p.read_text()) if p.is_file() else None


def collect(exp: Experiment) -> Compared:
    """What `exp`'s storage holds of its results."""
    from lab_assets.experiment.versions import all_partitions
    from resources.storage.open import open_store

    store = open_store(exp.storage_root, exp.name)
    out = Compared(exp, results=_read_file(store, CLASSIFICATION, None, RESULTS_FILE))
    for partition in all_partitions(exp, ADAPTER):
        ev = _read_file(store, ADAPTER, partition, EVAL_FILE)
        if ev is None:
            out.missing_adapters += 1
            continue
        ev["arm"] = _arm(exp, partition)
        out.evals.append(ev)
    return out


def _arm(exp: Experiment, partition: str) -> str:
    run_id = partition.split("|", 1)[-1]
    for run in exp.runs:
        if run.id == run_id:
            return run.arm
    return "main"


def _acc(r: dict | None) -> str:
    if not r or "accuracy" not in r:
        return "-"
    ci = f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if "ci_low" in r else ""
    return f"{r['accuracy']:.3f}{ci}"


def _p(r: dict | None, floor: float | None) -> str:
    if not r or r.get("p_value") is None:
        return "-"
    p = r["p_value"]
    return f"p<{p:.3f}" if floor is not None and p <= floor + 1e-12 else f"p={p:.3f}"


def headline_rows(c: Compared) -> list[list[str]]:
    r = c.results
    if r is None:
        return [[c.exp.name, "-", "not built: run `lab materialize` (or `lab sweep`)", "", "", ""]]
    floor = r.get("p_value_floor")
    head = r.get("headline_feature_set", "scale_free")
    rows = []
    for target in ("method", "task"):
        if target not in r:
            continue
        sets = (r.get("feature_sets") or {}).get(target, {})
        main = sets.get(head) or r[target]
        verdict = (r.get("verdicts") or {}).get(target, {})
        says = (
            "explained by norm"
            if verdict.get("explained_by_norm")
            else "beats controls"
            if verdict.get("beats_controls")
            else "-"
            if not verdict
            else "within the controls' CIs"
        )
        rows.append(
            [
                c.exp.name,
                target,
                f"{_acc(main)} {_p(main, floor)} (chance {main.get('chance', 0):.3f})",
                " / ".join(_acc(sets.get(k)).split(" ")[0] for k in CONTROLS),
                says,
                str(len(c.evals)),
            ]
        )
    return rows


def adapter_rows(c: Compared) -> list[list[str]]:
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for ev in c.evals:
        groups[(ev.get("arm", "main"), ev.get("method", "?"), ev.get("task", "?"))].append(ev)
    rows = []
    for (arm, method, task), evs in sorted(groups.items()):

        def m(key: str, evs: list[dict] = evs) -> str:
            vals = [e[key] for e in evs if isinstance(e.get(key), int | float)]
            return f"{mean(vals):.2f}" if vals else "-"

        beats = sum(1 for e in evs if e.get("beats_base"))
        rows.append(
            [
                c.exp.name,
                arm,
                method,
                task,
                str(len(evs)),
                f"{m('base_task_metric')} -> {m('task_metric')}",
                f"{m('base_nll')} -> {m('nll')}",
                m("pref_accuracy"),
                f"{beats}/{len(evs)}",
            ]
        )
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def plot(compared: list[Compared], path: Path) -> Path | None:
    """Headline accuracy (with its CI) beside the controls, per experiment and target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []  # (label, headline result, {control: accuracy})
    for c in compared:
        r = c.results
        if r is None:
            continue
        head = r.get("headline_feature_set", "scale_free")
        for target in ("method", "task"):
            sets = (r.get("feature_sets") or {}).get(target, {})
            main = sets.get(head) or r.get(target)
            if main:
                ctl = {k: sets[k]["accuracy"] for k in CONTROLS if k in sets}
                bars.append((f"{c.exp.name}\n{target}", main, ctl))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(bars) + 2), 4))
    width = 0.2
    for i, (_, main, ctl) in enumerate(bars):
        err = [
            [main["accuracy"] - main.get("ci_low", main["accuracy"])],
            [main.get("ci_high", main["accuracy"]) - main["accuracy"]],
        ]
        ax.bar(
            i - 1.5 * width,
            main["accuracy"],
            width,
            yerr=err,
            capsize=3,
            color="C0",
            label="scale-free (headline)" if i == 0 else None,
        )
        for j, k in enumerate(CONTROLS):
            if k in ctl:
                ax.bar(
                    i + (j - 0.5) * width,
                    ctl[k],
                    width,
                    color=f"C{j + 1}",
                    label=CONTROL_LABELS[k] if i == 0 else None,
                )
        ax.hlines(
            main.get("chance", 0),
            i - 2 * width,
            i + 2 * width,
            colors="k",
            linestyles=":",
            label="chance" if i == 0 else None,
        )
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("grouped-CV accuracy")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Headline vs controls, per experiment")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cmd_compare(args: argparse.Namespace) -> int:
    compared = [
        collect(load_experiment(p, named_by="lab compare's arguments")) for p in args.experiments
    ]
    names = [c.exp.name for c in compared]
    if len(set(names)) != len(names):
        print(f"lab compare: two files name the same experiment: {names}", file=sys.stderr)
        return 2
    print("Headline (scale-free features) and controls (norm only / random ΔW / all features)")
    print(
        _table(
            [
                "experiment",
                "target",
                "headline [95% CI]",
                "norm / random / all",
                "verdict",
                "adapters",
            ],
            [row for c in compared for row in headline_rows(c)],
        )
    )
    rows = [row for c in compared for row in adapter_rows(c)]
    print("\nAdapters on held-out data (means over seeds: base -> adapter)")
    if rows:
        print(
            _table(
                [
                    "experiment",
                    "arm",
                    "method",
                    "task",
                    "n",
                    "task metric",
                    "NLL",
                    "pref acc",
                    "beats base",
                ],
                rows,
            )
        )
    for c in compared:
        if c.missing_adapters:
            print(f"  {c.exp.name}: {c.missing_adapters} adapters not in storage")
    written = plot(compared, args.plot)
    if written is not None:
        print(f"\nplot: {written}")
    return 0
