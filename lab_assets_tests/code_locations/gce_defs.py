"""A torch-free code location for the GCE launcher tests (and the spot simulation).

Like ``launcher_defs`` for the local launcher, its one asset misbehaves on request
through run config (fail, crash, wait for an acknowledgement, hang), and it has a
``train`` mode: a simulated training loop that takes ``step_s`` per step,
checkpoints every ``checkpoint_every`` steps into ``$LAB_CHECKPOINT_DIR`` (mirrored
to GCS by the agent), checkpoints and stops when the VM is preempted, and resumes
from the newest checkpoint. Each step logs ``trained step N (attempt A)``, so a
test can count the work done, and lost, across VMs.

The launcher is pointed at the fake Compute Engine by ``LAB_GCE_API_ENDPOINT``
and at the GCS emulator by ``STORAGE_EMULATOR_HOST``; the IO manager writes to
the local ``LAB_STORAGE_ROOT`` (the fake's "VMs" are local processes).
"""

import json
import os
import shutil
import time
from pathlib import Path

from dagster import AssetExecutionContext, Config, Definitions, asset, in_process_executor

from lab_assets_tests.handshake import wait_for_ack
from resources.compute.gce.launcher import GceStepLauncherResource
from resources.compute.local.launcher import SCRATCH_ENV
from resources.io_manager import ArtifactIOManager, LabStorage
from resources.remote import preemption

BUCKET = "lab-test-bucket"
PROJECT = "lab-test-project"
ZONES = ["us-central1-a", "us-central1-b", "us-central1-c"]
GPU_ZONES = {
    "nvidia-l4": {
        "us-central1-a": ["g2-standard-4"],
        "us-central1-b": ["g2-standard-4", "g2-standard-8"],
        "us-central1-c": ["g2-standard-8"],
    }
}
# Round numbers for the tests, overriding the catalog (resources/compute/gce/gcp_catalog.csv).
PRICES = {
    "g2-standard-4": 0.70,
    "g2-standard-4:spot": 0.28,
    "g2-standard-8": 0.85,
    "g2-standard-8:spot": 0.34,
    "nvidia-l4": 0.0,  # the machine price above stands for the whole VM here
}


class WorkConfig(Config):
    mode: str = "ok"  # ok | fail | crash | handshake | hang | train
    handshake_dir: str = ""
    steps: int = 20
    step_s: float = 0.1
    checkpoint_every: int = 5
    progress_file: str = ""  # train: also append "attempt step" lines here (exact, unbuffered)


def _latest(ckpt: Path) -> int:
    done = [
        int(p.name.split("-")[1])
        for p in ckpt.glob("checkpoint-*")
        if (p / "trainer_state.json").is_file()
    ]
    return max(done, default=0)


def _save(ckpt: Path, step: int) -> None:
    d = ckpt / f"checkpoint-{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_text(json.dumps({"step": step}))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))  # last: complete
    for old in sorted(ckpt.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _train(context: AssetExecutionContext, config: WorkConfig, out: Path) -> None:
    ckpt = preemption.checkpoint_dir() or out / "ckpt"
    attempt = json.loads(os.environ.get("LAB_GCE_LAUNCH_INFO") or "{}").get("preemptions", 0) + 1
    start = _latest(ckpt)
    if start:
        context.log.info(f"resuming from checkpoint-{start}")
    for step in range(start + 1, config.steps + 1):
        time.sleep(config.step_s)
        context.log.info(f"trained step {step} (attempt {attempt})")
        if config.progress_file:
            with open(config.progress_file, "a") as f:
                f.write(f"{attempt} {step}\n")
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save(ckpt, step)
        if preemption.requested():
            _save(ckpt, step)
            context.log.info(f"preempted: checkpoint-{step} written, stopping")
            preemption.exit_after_checkpoint()
    (out / "result.json").write_text(json.dumps({"steps": config.steps, "resumed_from": start}))


@asset(required_resource_keys={"step_launcher"})
def gce_work(context: AssetExecutionContext, config: WorkConfig):
    scratch = Path(os.environ[SCRATCH_ENV])
    context.log.info(f"worker pid {os.getpid()} scratch {scratch}")
    print("plain worker output", flush=True)  # relayed at INFO
    print("UserWarning: a warning the worker printed", flush=True)  # relayed at WARNING
    out = scratch / "out"
    out.mkdir()
    (out / "result.txt").write_text("done")
    if config.mode in ("handshake", "hang"):
        wait_for_ack(context, config.handshake_dir, 30 if config.mode == "handshake" else 120)
    if config.mode == "fail":
        raise ValueError("asset failed on purpose")
    if config.mode == "crash":
        os._exit(3)
    if config.mode == "train":
        _train(context, config, out)
    return out


storage = LabStorage(root=os.environ.get("LAB_STORAGE_ROOT", "/nonexistent"), experiment="gce")


def launcher_for_tests(**settings) -> GceStepLauncherResource:
    """The GCE launcher of the test code locations: fast polls and heartbeats against the
    fake Compute server and the GCS emulator; `settings` override or add fields."""
    base = dict(
        project=PROJECT,
        zones=ZONES,
        machine_type="g2-standard-4",
        gpu_type="nvidia-l4",
        gpu_count=1,
        spot=True,
        storage_root=os.environ.get("LAB_STORAGE_ROOT", "/nonexistent"),
        experiment="gce",
        require_gcs_storage=False,
        bundle_install="skip",
        gpu_zones=GPU_ZONES,
        hourly_usd=PRICES,
        max_run_duration_s=3600,
        poll_interval_s=0.2,
        flush_interval_s=0.2,
        heartbeat_s=1.0,
        instance_check_s=0.5,
        grace_s=5.0,
        checkpoint_sync_s=0.2,
        preempted_poll_s=1,
    )
    return GceStepLauncherResource.configure_at_launch(**{**base, **settings})


launcher = launcher_for_tests(
    staging_root=f"gs://{BUCKET}/gce",
    max_preemptions=2,
    idle_minutes=0.0,  # one VM per step, deleted by its launcher (warm-VM tests set more)
    heartbeat_timeout_s=60.0,
    boot_timeout_s=60.0,
)
defs = Definitions(
    assets=[gce_work],
    resources={
        "step_launcher": launcher,
        "lab_storage": storage,
        "io_manager": ArtifactIOManager(storage=storage),
    },
    executor=in_process_executor,
)
