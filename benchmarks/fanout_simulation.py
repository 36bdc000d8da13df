"""The seed's sweep, fanned out: 30 partitions, a GPU quota of 8, warm VMs, preemptions and a
killed orchestrator, against the fake Compute Engine and the GCS emulator.

Each scenario runs the 30 partitions of ``fanout_work`` (``lab_assets_tests/code_locations/
gce_fanout_defs.py``) as 30 real Dagster runs through the real GCE step launcher, agent,
event relay, checkpoint mirroring, warm-VM claims and in-flight index. The orchestrator
is a subprocess (so that it can be SIGKILLed) that runs the partitions ``--quota`` at a
time in threads (``execute_job`` per partition, in-process executor), not through the
daemon's run queue: 30 queued runs at ~4 s of Python start each would measure the
daemon on 2 cores, not the VMs (the queue's own limit is tested in
``lab_assets_tests/orchestration/test_engine_gce.py``). Like ``lab sweep``, an
orchestrator skips partitions whose output is committed (manifest present).

Training is SIMULATED and torch-free (mode ``train``: ``--steps`` steps, a checkpoint
every ``--checkpoint-every`` steps and on SIGTERM, resume from the newest). Real
durations are divided by ``--factor``: a boot of ``--real-boot-s`` (90 s, a pre-baked
image) and a step of ``--real-step-s`` (600 s, one adapter) become the fake VM's boot
delay and the simulated step's length. What cannot be scaled is the fake's own cost
per step (an agent and a step-worker Python start with Dagster, ~3-5 s of CPU on
these 2 cores): it weighs more here than on GCE.

Scenarios (``--scenarios``):

- ``cold``: ``idle_minutes: 0``, one VM per partition (the launcher deletes each);
- ``warm``: ``idle_minutes`` > 0, each VM takes the next partition of its shape;
- ``poisson``: warm, with spot preemptions at Poisson times (mean ``--preempt-mean-s``)
  of a random VM that is running a step (SIGTERM, ``grace_s`` to checkpoint);
- ``kill``: warm; the orchestrator is SIGKILLed once ``--kill-after`` partitions are
  committed and restarted at once; the restarted one re-attaches to (or takes the
  outputs of) what is in flight.

Figures, one line per scenario: ``wall_s`` (first orchestrator start to the last
one's end), ``serial_wall_s`` (one partition at a time, each on its own VM: the mean
of ``--serial-sample`` such runs, measured once, times 30), ``speedup``,
``vm_boots`` (instances inserted), ``preemptions``, ``redone_steps`` (training steps
executed more than once, from the progress files), ``leaked_vms`` (instances still
alive ``lease_ttl_s`` + 20 s after the last orchestrator ended: warm VMs delete
themselves once no lease is live), ``duplicate_vms`` (a second VM training a
partition while another still did).

Run: ``python benchmarks/fanout_simulation.py [--factor 30] [--scenarios cold,warm,poisson,kill]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCENARIOS = ("cold", "warm", "poisson", "kill")
STAGING = "gs://lab-test-bucket/fanout"


def committed(storage: Path, partition: str) -> bool:
    return any(storage.glob(f"gce/fanout_work/*{partition}*/manifest.json"))


# -- the orchestrator (a subprocess) ---------------------------------------------------------


def orchestrate(spec: dict) -> int:
    """Run the spec's partitions, `quota` at a time; one `DONE <p> <ok> <seconds>` line each."""
    import warnings

    warnings.filterwarnings("ignore")
    from dagster import DagsterInstance

    from lab_assets_tests.code_locations.gce_fanout_defs import run_config, run_fanout

    storage = Path(os.environ["LAB_STORAGE_ROOT"])
    todo = [p for p in spec["partitions"] if not committed(storage, p)]
    t_start = time.perf_counter()
    lock = threading.Lock()
    Path(spec["home"]).mkdir(parents=True, exist_ok=True)

    with DagsterInstance.local_temp(spec["home"]) as instance:

        def one(partition: str) -> None:
            cfg = run_config(
                spec["idle_minutes"],
                spec["lease_ttl_s"],
                quiet=True,
                launcher={
                    "poll_interval_s": spec["poll_s"],
                    "flush_interval_s": spec["poll_s"],
                },
                mode="train",
                steps=spec["steps"],
                step_s=spec["step_s"],
                checkpoint_every=spec["checkpoint_every"],
                progress_file=f"{spec['progress']}/{partition}.progress",
            )
            t0 = time.perf_counter()
            try:
                with run_fanout(instance, partition, cfg) as result:
                    ok = result.success
                    why = [
                        e.step_failure_data.error.message.strip().splitlines()[0]
                        for e in result.all_events
                        if e.is_step_failure
                    ]
                if why:
                    with lock, open(spec["report"], "a") as f:
                        f.write(f"ERROR {partition} {why[0][:300]}\n")
            except Exception as e:  # noqa: BLE001 - reported, counted as a failure
                with lock, open(spec["report"], "a") as f:
                    f.write(f"ERROR {partition} {e!r}\n")
                ok = False
            t1 = time.perf_counter()
            # To a file: Dagster captures this process's stdout while a step runs.
            with lock, open(spec["report"], "a") as f:
                f.write(f"DONE {partition} {ok} {t1 - t0:.2f} start {t0 - t_start:.1f}\n")

        with ThreadPoolExecutor(spec["quota"]) as pool:
            list(pool.map(one, todo))
    return 0


# -- the benchmark (this process: the fake Compute Engine, the emulator, the clock) ----------


@dataclass
class Outcome:
    name: str
    wall_s: float
    vm_boots: int
    preemptions: int
    redone_steps: int
    leaked_vms: int
    duplicate_vms: int
    failed: list[str]


class Preempter:
    """Preempts a random VM that is running a step, at Poisson times."""

    def __init__(self, fake, mean_s: float, seed: int, grace_s: float = 5.0):
        self.fake, self.mean_s, self.grace_s = fake, mean_s, grace_s
        self.rng = random.Random(seed)
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _working(self) -> list[str]:
        from resources.compute.gce.gcs import Gcs
        from resources.remote.protocol import VMS_DIR

        gcs = Gcs()
        out = []
        for inst in self.fake.live():
            if inst.status != "RUNNING":
                continue
            life = gcs.read_json(f"{STAGING}/{VMS_DIR}/{inst.name}.json") or {}
            if life.get("state") == "working":
                out.append(inst.name)
        return out

    def _run(self) -> None:
        while not self.stop.wait(self.rng.expovariate(1.0 / self.mean_s)):
            working = self._working()
            if working:
                self.fake.preempt(self.rng.choice(sorted(working)), grace_s=self.grace_s)
                self.count += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def progress_figures(progress: Path, steps: int) -> tuple[int, int, list[str]]:
    """(steps executed more than once, extra VMs that trained a partition at the same time as
    another, partitions that did not finish training)."""
    redone = duplicates = 0
    unfinished = []
    for f in sorted(progress.glob("*.progress")):
        rows = [line.split() for line in f.read_text().splitlines() if line.strip()]
        redone += max(0, len(rows) - steps)
        if {int(r[1]) for r in rows} != set(range(1, steps + 1)):
            unfinished.append(f.stem)
        spans: dict[str, list[float]] = {}
        for _attempt, _step, vm, t in rows:
            lo, hi = spans.get(vm, [float(t), float(t)])
            spans[vm] = [min(lo, float(t)), max(hi, float(t))]
        ordered = sorted(spans.values())
        duplicates += sum(1 for a, b in zip(ordered, ordered[1:], strict=False) if b[0] < a[1])
    return redone, duplicates, unfinished


class Bench:
    def __init__(self, args, fake, workdir: Path):
        self.args, self.fake, self.workdir = args, fake, workdir
        self.partitions = [f"p{i:02d}" for i in range(args.partitions)]
        self.boot_s = args.real_boot_s / args.factor
        self.step_s = args.real_step_s / args.factor / args.steps

    def spec(self, name: str, idle_minutes: float, quota: int, partitions: list[str]) -> dict:
        d = self.workdir / name
        (d / "progress").mkdir(parents=True, exist_ok=True)
        return {
            "partitions": partitions,
            "quota": quota,
            "idle_minutes": idle_minutes,
            "lease_ttl_s": self.args.lease_ttl_s,
            "steps": self.args.steps,
            "step_s": self.step_s,
            "checkpoint_every": self.args.checkpoint_every,
            "poll_s": self.args.poll_s,
            "progress": str(d / "progress"),
            "report": str(d / "report.txt"),
            "home": str(d / f"home-{time.monotonic_ns()}"),
        }

    def start(self, name: str, spec: dict) -> subprocess.Popen:
        env = {
            **os.environ,
            "LAB_STORAGE_ROOT": str(self.workdir / name / "storage"),
            "DAGSTER_HOME": spec["home"],
        }
        Path(env["LAB_STORAGE_ROOT"]).mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [sys.executable, __file__, "--orchestrate", json.dumps(spec)],
            cwd=str(REPO),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def serial_wall(self) -> float:
        """One partition at a time on its own VM: the mean of a few such runs, times 30."""
        n = self.args.serial_sample
        spec = self.spec("serial", 0, 1, self.partitions[:n])
        proc = self.start("serial", spec)
        proc.communicate()
        out = Path(spec["report"]).read_text()
        times = [float(line.split()[3]) for line in out.splitlines() if line.startswith("DONE")]
        if len(times) != n:
            raise RuntimeError(f"serial sample: {out}")
        self.wait_gone()
        return sum(times) / n * len(self.partitions)

    def wait_gone(self, timeout: float | None = None) -> int:
        deadline = time.time() + (timeout or self.args.lease_ttl_s + 20)
        while time.time() < deadline and self.fake.live():
            time.sleep(0.2)
        return len(self.fake.live())

    def scenario(self, name: str) -> Outcome:
        a = self.args
        idle = 0 if name == "cold" else a.idle_minutes
        spec = self.spec(name, idle, a.quota, self.partitions)
        storage = self.workdir / name / "storage"
        inserted = len(self.fake.inserted)
        preempter = Preempter(self.fake, a.preempt_mean_s, a.seed) if name == "poisson" else None
        t0 = time.perf_counter()
        outputs = []
        if preempter:
            preempter.__enter__()
        try:
            proc = self.start(name, spec)
            report = Path(spec["report"])
            if name == "kill":
                while proc.poll() is None and sum(
                    committed(storage, p) for p in self.partitions
                ) < min(a.kill_after, len(self.partitions)):
                    time.sleep(0.1)
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                proc = self.start(name, {**spec, "home": spec["home"] + "-restarted"})
            proc.communicate()
            outputs.append(report.read_text() if report.exists() else "")
        finally:
            if preempter:
                preempter.__exit__()
        wall = time.perf_counter() - t0
        if a.verbose:
            print("\n".join(o for o in outputs), flush=True)
            for o in outputs:
                for line in o.splitlines():
                    if line.startswith("ERROR") and "VM lab-" in line:
                        vm = line.split("VM ", 1)[1].split(":")[0]
                        print(f"--- serial console of {vm}:\n{self.fake.serial_output(vm)[-3000:]}")
        leaked = self.wait_gone()
        redone, duplicates, unfinished = progress_figures(Path(spec["progress"]), a.steps)
        failed = sorted(
            {line.split()[1] for o in outputs for line in o.splitlines() if " False " in line}
            | set(unfinished)
        )
        return Outcome(
            name,
            wall,
            len(self.fake.inserted) - inserted,
            preempter.count if preempter else 0,
            redone,
            leaked,
            duplicates,
            failed,
        )


def prebake(fake) -> None:
    """A pre-baked image in the lab's family, so the fake's VMs boot as from `lab image build`
    (no bootstrap): the boot delay is then the scaled boot alone."""
    from lab_assets_tests.fakes.fake_compute_wire import API

    name = "task-geometry-lab-bench"
    fake.images[("lab-test-project", name)] = {
        "kind": "compute#image",
        "id": "4242",
        "name": name,
        "family": "task-geometry-lab",
        "status": "READY",
        "diskSizeGb": "50",
        "creationTimestamp": "2026-11-01T00:00:00.000Z",
        "selfLink": f"{API}/projects/lab-test-project/global/images/{name}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orchestrate", help=argparse.SUPPRESS)
    ap.add_argument("--partitions", type=int, default=30)
    ap.add_argument("--quota", type=int, default=8)
    ap.add_argument("--factor", type=float, default=30.0, help="real durations / this")
    ap.add_argument("--real-boot-s", type=float, default=90.0)
    ap.add_argument("--real-step-s", type=float, default=600.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--idle-minutes", type=float, default=5.0)
    ap.add_argument("--lease-ttl-s", type=float, default=15.0)
    ap.add_argument("--preempt-mean-s", type=float, default=12.0)
    ap.add_argument("--kill-after", type=int, default=12, help="committed partitions")
    ap.add_argument("--serial-sample", type=int, default=2)
    ap.add_argument(
        "--serial-wall-s", type=float, default=0.0, help="reuse a measured serial wall time"
    )
    ap.add_argument(
        "--poll-s", type=float, default=0.5, help="launcher poll and agent flush interval"
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--verbose", action="store_true", help="print each run's time")
    args = ap.parse_args(argv)
    if args.orchestrate:
        return orchestrate(json.loads(args.orchestrate))

    workdir = Path(tempfile.mkdtemp(prefix="fanout-sim-"))
    os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "lab-test-project")
    from lab_assets_tests.fakes.fake_compute import FakeCompute
    from lab_assets_tests.gce_fixtures import gcs_emulator_server
    from resources.compute.gce.api import ENDPOINT_ENV
    from resources.remote.protocol import make_storage_client

    bench_boot = args.real_boot_s / args.factor
    print(
        f"SIMULATED sweep: {args.partitions} partitions, quota {args.quota}; real boot "
        f"{args.real_boot_s:.0f}s and step {args.real_step_s:.0f}s / {args.factor:g} = boot "
        f"{bench_boot:.2f}s, step {args.real_step_s / args.factor:.2f}s ({args.steps} steps, "
        f"checkpoint every {args.checkpoint_every}); idle_minutes {args.idle_minutes:g}, "
        f"lease_ttl_s {args.lease_ttl_s:g}. Fake GCE + GCS emulator on 127.0.0.1.",
        flush=True,
    )
    outcomes: list[Outcome] = []
    try:
        with gcs_emulator_server(), FakeCompute(boot_delay_s=bench_boot) as fake:
            os.environ[ENDPOINT_ENV] = fake.endpoint
            make_storage_client().create_bucket("lab-test-bucket")
            prebake(fake)
            bench = Bench(args, fake, workdir)
            serial = args.serial_wall_s or bench.serial_wall()
            print(f"serial: {serial:.1f}s (one partition at a time, each on its own VM)")
            for name in [s for s in args.scenarios.split(",") if s]:
                o = bench.scenario(name)
                outcomes.append(o)
                print(
                    f"scenario={o.name} partitions={args.partitions} quota={args.quota} "
                    f"wall_s={o.wall_s:.1f} serial_wall_s={serial:.1f} "
                    f"speedup={serial / o.wall_s:.2f} vm_boots={o.vm_boots} "
                    f"preemptions={o.preemptions} redone_steps={o.redone_steps} "
                    f"leaked_vms={o.leaked_vms} duplicate_vms={o.duplicate_vms}"
                    + (f"  FAILED: {' '.join(o.failed)}" if o.failed else ""),
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(not o.failed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
