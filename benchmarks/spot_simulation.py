"""SpotShield's question: what do spot preemptions cost a training run, against on-demand?

Runs one training step through the real GCE step launcher, agent, event relay,
checkpoint mirroring and zone failover, against the fake Compute Engine and the
GCS emulator (``lab_assets_tests/fakes/fake_compute.py``), under preemption patterns:

- ``on-demand``: no preemptions, on-demand price (the baseline);
- ``regular``: every spot VM is preempted ``--mean-s`` seconds into its training;
- ``poisson``: each VM lives an exponential time of mean ``--mean-s`` (seeded);
- ``bursty``: a two-state chain over successive VMs, starting in a burst: VMs in a
  burst live 0.3 x mean (the burst goes on with p=0.6), calm VMs 3 x mean (a new
  burst starts with p=0.2), seeded: a capacity crunch right at launch;
- ``regular-hard``: like regular, but no warning (SIGKILL at once): the step cannot
  checkpoint on SIGTERM and falls back to its last periodic checkpoint.

Training is SIMULATED and torch-free (``lab_assets_tests/code_locations/gce_defs.py``, mode
``train``): each step sleeps ``--step-s`` seconds, a checkpoint is written every
``--checkpoint-every`` steps and on SIGTERM, and the step resumes from the newest
one in GCS. Every executed step is appended to a progress file, so re-done work is
counted exactly. A fake VM's "boot" (agent + step worker: two Python starts with
Dagster) costs a few seconds here; on GCE it is one to three minutes, so the
overhead share printed here is not GCE's: the re-done steps and the per-preemption
overhead are what transfer. Prices: the g2-standard-4 row of the test price table
(on-demand $0.70/h, spot $0.28/h), VM time as the launcher measured it.

Run: ``python benchmarks/spot_simulation.py [--steps 60] [--step-s 0.15]
[--checkpoint-every 10] [--mean-s 5] [--seed 7] [--patterns on-demand,regular,...]``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATTERNS = ("on-demand", "regular", "poisson", "bursty", "regular-hard")


@dataclass
class Outcome:
    pattern: str
    success: bool
    preemptions: int
    vm_seconds: float
    cost_usd: float
    executed_steps: int
    wall_s: float
    zones: str


def lifetimes(pattern: str, mean_s: float, seed: int) -> Callable[[], float | None]:
    """Seconds each successive VM lives before its preemption (None: never preempted)."""
    rng = random.Random(seed)
    state = {"burst": True, "first": True}

    def next_life() -> float | None:
        if pattern == "on-demand":
            return None
        if pattern in ("regular", "regular-hard"):
            return mean_s
        if pattern == "poisson":
            return rng.expovariate(1.0 / mean_s)
        if pattern == "bursty":
            if not state.pop("first", False):
                state["burst"] = rng.random() < (0.6 if state["burst"] else 0.2)
            return 0.3 * mean_s if state["burst"] else 3.0 * mean_s
        raise ValueError(pattern)

    return next_life


class Preempter:
    """Preempts each new fake VM when its drawn lifetime runs out.

    A lifetime counts from the VM's first training step (its attempt's first line in
    the progress file): a fake VM boots in seconds, a real one in minutes, so
    counting from creation would let the fake's boot time decide the outcome.
    """

    def __init__(self, fake, next_life: Callable[[], float | None], grace_s: float, progress: Path):
        self.fake, self.next_life, self.grace_s = fake, next_life, grace_s
        self.progress = progress
        self.seen: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _training(self) -> set[str]:
        try:
            return {line.split()[0] for line in self.progress.read_text().splitlines() if line}
        except FileNotFoundError:
            return set()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            training = self._training()
            for inst in self.fake.live():
                attempt = inst.name.rsplit("-a", 1)[-1]
                if inst.name in self.seen or attempt not in training:
                    continue
                self.seen.add(inst.name)
                life = self.next_life()
                if life is not None:
                    t = threading.Timer(life, self._preempt, args=(inst.name,))
                    t.daemon = True
                    t.start()

    def _preempt(self, name: str) -> None:
        if not self.stop.is_set():
            self.fake.preempt(name, grace_s=self.grace_s)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_pattern(pattern: str, args, fake, instance, workdir: Path) -> Outcome:
    from lab_assets_tests.gce_fixtures import run_gce_job

    progress = workdir / f"{pattern}.progress"
    grace = 0.0 if pattern == "regular-hard" else 5.0
    cfg = {
        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
        "resources": {
            "step_launcher": {
                "config": {"spot": pattern != "on-demand", "max_preemptions": args.max_preemptions}
            }
        },
    }
    t0 = time.perf_counter()
    with Preempter(fake, lifetimes(pattern, args.mean_s, args.seed), grace, progress):
        with run_gce_job(
            instance,
            run_config=cfg,
            mode="train",
            steps=args.steps,
            step_s=args.step_s,
            checkpoint_every=args.checkpoint_every,
            progress_file=str(progress),
        ) as result:
            success = result.success
            run_id = result.run_id
    wall = time.perf_counter() - t0
    obs = [
        e.dagster_event.asset_observation_data.asset_observation.metadata
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_OBSERVATION"
    ]
    ledger_s, ledger_usd = _ledger(run_id)
    meta = {k: getattr(v, "value", v) for k, v in (obs[0] if obs else {}).items()}
    executed = len(progress.read_text().splitlines()) if progress.exists() else 0
    return Outcome(
        pattern,
        success,
        int(
            meta.get(
                "gce/preemptions", sum(1 for b in fake.inserted if b["labels"]["run"] == run_id) - 1
            )
        ),
        float(meta.get("gce/vm_seconds", ledger_s)),
        float(meta.get("gce/cost_usd", ledger_usd)),
        executed,
        wall,
        str(meta.get("gce/zones_used", "")),
    )


def _ledger(run_id: str) -> tuple[float, float]:
    from resources.compute.gce.gcs import Gcs

    gcs = Gcs()
    entries = [gcs.read_json(u) for u in gcs.list("gs://lab-test-bucket/gce/_gce/ledger")]
    mine = [e for e in entries if e and e.get("run_id") == run_id]
    return sum(e.get("vm_seconds", 0) for e in mine), sum(e.get("cost_usd", 0) for e in mine)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--step-s", type=float, default=0.15)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--mean-s", type=float, default=5.0, help="mean VM lifetime (spot)")
    ap.add_argument("--max-preemptions", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    args = ap.parse_args(argv)
    patterns = [p for p in args.patterns.split(",") if p]

    workdir = Path(tempfile.mkdtemp(prefix="spot-sim-"))
    os.environ["LAB_STORAGE_ROOT"] = str(workdir / "storage")
    os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "lab-test-project")
    os.environ["DAGSTER_HOME"] = str(workdir / "dagster_home")
    (workdir / "dagster_home").mkdir()
    (workdir / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    import warnings

    warnings.filterwarnings("ignore")
    from dagster import DagsterInstance

    from lab_assets_tests.fakes.fake_compute import FakeCompute
    from lab_assets_tests.gce_fixtures import gcs_emulator_server
    from resources.compute.gce.api import ENDPOINT_ENV
    from resources.remote.protocol import make_storage_client as storage_client

    useful = args.steps * args.step_s
    print(
        "SIMULATED training (torch-free): "
        f"{args.steps} steps x {args.step_s}s = {useful:.1f}s of useful work, checkpoint every "
        f"{args.checkpoint_every} steps and on SIGTERM; mean VM lifetime under preemption "
        f"{args.mean_s}s of training; seed {args.seed}. Fake GCE + GCS emulator on 127.0.0.1.\n"
    )
    outcomes: list[Outcome] = []
    try:
        with gcs_emulator_server(), FakeCompute() as fake:
            os.environ[ENDPOINT_ENV] = fake.endpoint
            storage_client().create_bucket("lab-test-bucket")
            with DagsterInstance.local_temp(str(workdir / "dagster_home")) as instance:
                for pattern in patterns:
                    o = run_pattern(pattern, args, fake, instance, workdir)
                    outcomes.append(o)
                    print(
                        f"  {pattern:13s} {'ok' if o.success else 'FAILED'}: {o.preemptions} "
                        f"preemption(s), {o.vm_seconds:.1f} VM-s, {o.executed_steps} steps "
                        f"executed, ${o.cost_usd:.6f}, {o.wall_s:.1f}s wall",
                        flush=True,
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = next((o for o in outcomes if o.pattern == "on-demand"), None)
    print(
        f"\n{'pattern':13s} {'preempt':>7s} {'VM-s':>6s} {'wasted VM-s':>12s} "
        f"{'re-done':>7s} {'cost $':>10s} {'vs on-demand':>12s}"
    )
    for o in outcomes:
        wasted = o.vm_seconds - useful
        redone = f"{o.executed_steps - args.steps:7d}" if o.success else "      -"
        rel = f"{o.cost_usd / base.cost_usd:11.0%}" if base and base.cost_usd else "          -"
        print(
            f"{o.pattern:13s} {o.preemptions:7d} {o.vm_seconds:6.1f} "
            f"{wasted:6.1f} ({wasted / max(o.vm_seconds, 1e-9):3.0%}) {redone} "
            f"{o.cost_usd:10.6f} {rel:>12s}{'' if o.success else '  (run FAILED)'}"
        )
    print(
        "\nwasted VM-s = VM time - useful work: boots (a few s per VM here, 1-3 min on GCE), "
        "re-done steps, shutdown grace.\nre-done = steps executed more than once (lost to "
        "preemption): ~0 with checkpoint-on-SIGTERM, up to one checkpoint interval per "
        "preemption without it (regular-hard)."
    )
    return 0 if all(o.success for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
