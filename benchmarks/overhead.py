"""What the lab costs on top of the work: the plain loop vs `lab materialize`, one machine, one run.

(a) plain: the project's own functions for every partition of the default experiment
    in one Python process (imports included): build and pre-train the base model, its
    spectrum, then for every adapter `train_adapter` + `evaluate_heldout` +
    `adapter_spectrum`, then the classification with its controls.
(b) lab: `lab materialize` of the same experiment as a subprocess, into a fresh
    Dagster instance and storage (the daemon it starts, the run queue, one run
    process per partition group, the step workers, the IO manager, manifests).

Prints one line: `plain_s=<float> lab_s=<float> ratio=<float>`.

    .venv/bin/python benchmarks/overhead.py [--experiment experiments/tiny.yaml]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plain(experiment: Path, work: Path) -> float:
    """The plain loop in a fresh interpreter, so imports are counted as they are for lab."""
    code = f"""
import time
t0 = time.perf_counter()
from pathlib import Path
import pandas as pd
from lab_assets.experiment.load import load_experiment
from lab_assets.ml.tiny_model import TinyModelSpec, build_tiny_model
from lab_assets.ml.spectral import adapter_spectrum, compute_base_spectrum
from lab_assets.ml.train import TrainSpec, train_adapter
from lab_assets.ml.evaluate import evaluate_heldout
from lab_assets.ml.controls import classify_with_controls
exp = load_experiment({str(experiment)!r})
work = Path({str(work)!r})
frames = {{}}
labels = {{}}
sp = exp.file.spectrum
for m in exp.file.base_models:
    base = work / m.id
    build_tiny_model(base, TinyModelSpec(**m.source.model_dump(exclude={{"kind"}})))
    k, full = (sp.top_k, 1024) if sp.base_k is None else (max(sp.base_k, sp.top_k), 0)
    spectra = compute_base_spectrum(base, exp.target_modules(), k, full_up_to=full)
    for run in exp.runs:
        out = work / m.id / run.id
        spec = TrainSpec(
            method=run.method, task=run.task, seed=run.seed,
            shuffle_preferences=run.arm == "shuffled_preferences", **run.hyper.model_dump(),
        )
        train_adapter(base, out, spec)
        evaluate_heldout(base, out, run.method, run.task, dpo_beta=spec.dpo_beta)
        key = f"{{m.id}}|{{run.id}}"
        frames[key] = adapter_spectrum(
            out, base_dir=base, base_spectrum=spectra, top_k=sp.top_k,
            intruder_k=sp.intruder_k, intruder_threshold=sp.intruder_threshold,
        )
        labels[key] = {{"method": run.method, "task": run.task,
                        "group": f"{{m.id}}/s{{run.seed}}", "arm": run.arm}}
classify_with_controls(
    frames, pd.DataFrame.from_dict(labels, orient="index"),
    exp.file.classification.n_permutations,
)
print(time.perf_counter() - t0)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def lab(experiment: Path, work: Path) -> float:
    env = {
        **os.environ,
        "DAGSTER_HOME": str(work / "home"),
        "LAB_STORAGE_ROOT": str(work / "storage"),
        "LAB_SCRATCH_ROOT": str(work / "scratch"),
    }
    (work / "scratch").mkdir(parents=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lab_assets.cli", "materialize", "--experiment", str(experiment)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"lab materialize failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default=str(REPO / "experiments" / "tiny.yaml"))
    args = ap.parse_args()
    experiment = Path(args.experiment).resolve()
    with tempfile.TemporaryDirectory(prefix="lab-overhead-") as tmp:
        plain_s = plain(experiment, Path(tmp) / "plain")
        lab_s = lab(experiment, Path(tmp) / "lab")
    print(f"plain_s={plain_s:.1f} lab_s={lab_s:.1f} ratio={lab_s / plain_s:.2f}")


if __name__ == "__main__":
    main()
