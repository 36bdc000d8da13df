"""Adapter training on a spot VM: checkpoints in GCS, and a checkpoint when preempted.

Under the GCE agent the step sees ``LAB_CHECKPOINT_DIR`` (a local directory the
agent fills from GCS before the step starts and mirrors back to GCS while it
runs) and, on preemption, a SIGTERM that ``resources.remote.preemption`` turns into
a flag. ``preemptible_training()`` gives ``train_adapter`` that directory (so the
HF Trainer checkpoints every ``checkpoint_every`` steps, with optimizer, scheduler
and RNG state, and resumes from the newest complete checkpoint) and a callback
that, once the flag is up, saves a checkpoint at the end of the current step and
stops the worker. So at most the step in progress is lost to a preemption that
gives the usual 30 s warning, and at most one checkpoint interval otherwise.
Elsewhere (local runs) it returns nothing and training is unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from resources.remote import preemption
from resources.remote.protocol import CHECKPOINT_EVERY_ENV


def preemptible_training() -> dict[str, Any]:
    """Extra `train_adapter` keyword arguments for this process (empty off a GCE VM)."""
    ckpt = preemption.checkpoint_dir()
    if ckpt is None:
        return {}
    return {
        "checkpoint_dir": ckpt,
        "checkpoint_every": int(os.environ.get(CHECKPOINT_EVERY_ENV) or 10),
        "extra_callbacks": [checkpoint_on_preemption()],
    }


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
