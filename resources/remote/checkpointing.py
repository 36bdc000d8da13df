"""Adapter training on a spot VM: checkpoints in GCS, and a checkpoint when preempted.

Under the GCE agent the step sees ``LAB_CHECKPOINT_DIR`` (a local directory the
agent fills from GCS before the step starts and mirrors back to GCS while it
runs) and, on preemption, a SIGTERM that ``resources.remote.preemption`` turns into
a flag. ``preemptible_training()`` gives ``train_adapter`` that directory (so the
HF Trainer checkpoints every ``checkpoint_every`` steps, with optimizer, scheduler
and RNG state, and resumes from the newest complete checkpoint) and a callback
that, once the flag is up, saves a checkpoint at the end of the current step and
stops the worker. Each checkpoint counts only once it is durable: after writing one
the step waits until the agent has uploaded it (``durable_checkpoints``). So at most
the step in progress is lost to a preemption that gives the usual 30 s warning, and
at most one checkpoint interval to a VM lost without warning.

Local runs checkpoint too (``local_checkpointing``): into a directory that outlives the
step's scratch (``$LAB_CHECKPOINT_ROOT``, else ``lab-checkpoints`` under the system temp
dir), one per partition and training spec, every ``$LAB_CHECKPOINT_EVERY`` steps
(default 100; a run no longer than that is not checkpointed: nothing to save). A run
killed mid-training resumes from there when the partition is built again; the
directory is deleted once the adapter is stored (``discard_local_checkpoints``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from resources.remote import preemption
from resources.remote.protocol import (
    CHECKPOINT_EVERY_ENV,
    CHECKPOINT_SYNC_TIMEOUT_ENV,
    LOCAL_CHECKPOINT_ROOT_ENV,
    SYNC_DONE,
    SYNC_REQUEST,
)

DEFAULT_LOCAL_EVERY = 100


def preemptible_training() -> dict[str, Any]:
    """Extra `train_adapter` keyword arguments for this process (empty off a GCE VM)."""
    ckpt = preemption.checkpoint_dir()
    if ckpt is None:
        return {}
    return {
        "checkpoint_dir": ckpt,
        "checkpoint_every": int(os.environ.get(CHECKPOINT_EVERY_ENV) or 10),
        "extra_callbacks": [durable_checkpoints(ckpt), checkpoint_on_preemption()],
    }


def wait_until_durable(ckpt: Path, name: str, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Ask the agent to upload checkpoint `name` now and wait for its answer (True), or
    give up after `timeout_s` (False: training goes on; the periodic sync still runs)."""
    request = ckpt / SYNC_REQUEST
    tmp = request.with_name(request.name + ".tmp")
    tmp.write_text(name)
    tmp.replace(request)
    done = ckpt / SYNC_DONE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if done.read_text().strip() == name:
                return True
        except FileNotFoundError:
            pass
        time.sleep(poll_s)
    return False


def durable_checkpoints(ckpt: Path):
    """A `TrainerCallback`: after each checkpoint is written, wait until the agent has it
    in GCS. Training never runs past a checkpoint interval on a checkpoint that exists
    only on the VM's disk, so a VM lost without warning costs at most one interval."""
    from transformers import TrainerCallback

    timeout_s = float(os.environ.get(CHECKPOINT_SYNC_TIMEOUT_ENV) or 600)

    class DurableCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            name = f"checkpoint-{state.global_step}"  # the HF Trainer's folder name
            t0 = time.monotonic()
            if wait_until_durable(ckpt, name, timeout_s):
                print(f"{name} durable in {time.monotonic() - t0:.1f} s", flush=True)
            else:
                print(f"{name}: not confirmed in GCS after {timeout_s:g} s; going on", flush=True)
            return control

    return DurableCheckpoints()


def checkpoint_on_preemption():
    """A `TrainerCallback`: on preemption, save at the end of this step, then stop the worker."""
    from transformers import TrainerCallback

    class CheckpointOnPreemption(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if preemption.requested():
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            # The Trainer calls this after the checkpoint (trainer_state.json last) is on disk.
            if preemption.requested():
                preemption.exit_after_checkpoint()
            return control

    return CheckpointOnPreemption()


def local_checkpoint_root() -> Path:
    root = os.environ.get(LOCAL_CHECKPOINT_ROOT_ENV)
    return Path(root) if root else Path(tempfile.gettempdir()) / "lab-checkpoints"


def local_checkpointing(partition: str, identity: str, steps: int) -> dict[str, Any]:
    """`train_adapter` keyword arguments that checkpoint a local run durably, or {} when
    the run is too short to checkpoint. `identity` names what is trained (its spec and
    base model): another identity gets another directory, never a wrong resume."""
    every = int(os.environ.get(CHECKPOINT_EVERY_ENV) or DEFAULT_LOCAL_EVERY)
    if steps <= every:
        return {}
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", partition)[:80]
    tag = hashlib.sha256(f"{partition}\0{identity}".encode()).hexdigest()[:16]
    return {"checkpoint_dir": local_checkpoint_root() / f"{safe}-{tag}", "checkpoint_every": every}


def discard_local_checkpoints(kwargs: dict[str, Any]) -> None:
    """After the adapter is stored: delete a local run's checkpoints (a VM's are the agent's)."""
    ckpt = kwargs.get("checkpoint_dir")
    if ckpt is not None and Path(ckpt).parent == local_checkpoint_root():
        shutil.rmtree(ckpt, ignore_errors=True)
