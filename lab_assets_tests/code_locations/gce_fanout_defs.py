"""A partitioned, torch-free code location for the warm-VM and re-attach tests and the fan-out
benchmark (``benchmarks/fanout_simulation.py``).

One asset, ``fanout_work``, with 30 static partitions (``p00`` ... ``p29``), the shape of
the seed's sweep of adapters. Its step is ``gce_defs``'s: ``ok``, ``hang`` (wait for an
ack) or ``train`` (a simulated training loop that checkpoints, resumes and appends
every executed step to ``progress_file``). Each partition's output goes through the
lab's IO manager, so a step that finished commits a manifest under the storage root.

The launcher is the GCE step launcher, pointed at the fake Compute Engine and the GCS
emulator like ``gce_defs``; ``idle_minutes`` and ``lease_ttl_s`` come from run config
(``run_fanout`` sets them), so the same location serves one-VM-per-step and warm runs.
"""

import json
import os
import time
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    Definitions,
    StaticPartitionsDefinition,
    asset,
    in_process_executor,
)

from lab_assets_tests.code_locations.gce_defs import (
    BUCKET,
    WorkConfig,
    _latest,
    _save,
    launcher_for_tests,
)
from lab_assets_tests.handshake import wait_for_ack
from resources.compute.local.launcher import SCRATCH_ENV
from resources.io_manager import ArtifactIOManager, LabStorage
from resources.remote import preemption

PARTITIONS = [f"p{i:02d}" for i in range(30)]


def _train(context: AssetExecutionContext, config: WorkConfig) -> None:
    """``gce_defs``'s simulated training, each executed step appended to ``progress_file`` as
    ``<attempt> <step> <vm> <time>``: which VM did which step when (re-done steps, and two
    VMs on one partition at once, can be counted from it)."""
    info = json.loads(os.environ.get("LAB_GCE_LAUNCH_INFO") or "{}")
    vm, attempt = info.get("vm_name", "local"), info.get("preemptions", 0) + 1
    ckpt = preemption.checkpoint_dir() or Path(os.environ[SCRATCH_ENV]) / "ckpt"
    start = _latest(ckpt)
    if start:
        context.log.info(f"resuming from checkpoint-{start}")
    for step in range(start + 1, config.steps + 1):
        time.sleep(config.step_s)
        context.log.info(f"trained step {step} (attempt {attempt})")
        if config.progress_file:
            with open(config.progress_file, "a") as f:
                f.write(f"{attempt} {step} {vm} {time.time():.3f}\n")
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save(ckpt, step)
        if preemption.requested():
            _save(ckpt, step)
            context.log.info(f"preempted: checkpoint-{step} written, stopping")
            preemption.exit_after_checkpoint()


@asset(
    partitions_def=StaticPartitionsDefinition(PARTITIONS),
    required_resource_keys={"step_launcher"},
)
def fanout_work(context: AssetExecutionContext, config: WorkConfig):
    out = Path(os.environ[SCRATCH_ENV]) / "out"
    out.mkdir()
    context.log.info(f"partition {context.partition_key} on worker pid {os.getpid()}")
    if config.mode in ("handshake", "hang"):
        wait_for_ack(context, config.handshake_dir, 30 if config.mode == "handshake" else 120)
    if config.mode == "train":
        _train(context, config)
    (out / "result.txt").write_text(context.partition_key)
    return out


storage = LabStorage(root=os.environ.get("LAB_STORAGE_ROOT", "/nonexistent"), experiment="gce")
launcher = launcher_for_tests(
    staging_root=f"gs://{BUCKET}/fanout",
    max_preemptions=8,
    heartbeat_timeout_s=30.0,
    boot_timeout_s=120.0,
)
defs = Definitions(
    assets=[fanout_work],
    resources={
        "step_launcher": launcher,
        "lab_storage": storage,
        "io_manager": ArtifactIOManager(storage=storage),
    },
    executor=in_process_executor,
)


def run_config(
    idle_minutes: float,
    lease_ttl_s: float = 30.0,
    quiet: bool = False,
    launcher: dict | None = None,
    **work,
) -> dict:
    """Run config for one partition's run: the launcher's warm settings (and any other
    `launcher` settings) and the step's work."""
    settings = {"idle_minutes": idle_minutes, "lease_ttl_s": lease_ttl_s, **(launcher or {})}
    cfg: dict = {
        "ops": {"fanout_work": {"config": work}},
        "resources": {"step_launcher": {"config": settings}},
    }
    if quiet:
        cfg["loggers"] = {"console": {"config": {"log_level": "CRITICAL"}}}
    return cfg


def run_fanout(instance, partition: str, cfg: dict):
    """Execute `fanout_work[partition]` in this process (a context manager, as execute_job)."""
    from dagster import execute_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from lab_assets_tests.fakes.fake_compute import REPO_ROOT

    repo = ReconstructableRepository.for_module(
        "lab_assets_tests.code_locations.gce_fanout_defs", "defs", working_directory=str(REPO_ROOT)
    )
    return execute_job(
        repo.get_reconstructable_job("__ASSET_JOB"),
        instance=instance,
        run_config=cfg,
        tags={"dagster/partition": partition},
        raise_on_error=False,
    )
