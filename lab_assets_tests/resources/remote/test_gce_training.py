"""Real `train_adapter` preempted and resumed through GCS, the way the GCE agent does it.

A tiny Llama is built; attempt 1 trains in a subprocess with the agent's
environment (``LAB_CHECKPOINT_DIR``, ``LAB_PREEMPTIBLE=1``) and gets SIGTERM
mid-run: the HF Trainer callback saves a checkpoint (optimizer, scheduler, RNG
state) at the end of the current step and the worker exits with the preempted
code. The agent's ``CheckpointSync`` uploads it to the GCS emulator; attempt 2,
on a fresh directory (a new VM), downloads it and finishes the run. At most the
step in progress is lost.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from lab_assets_tests.fakes.fake_compute import REPO_ROOT
from lab_assets_tests.gce_fixtures import BUCKET
from resources.remote.agent_sync import CheckpointSync
from resources.remote.preemption import PREEMPTED_EXIT_CODE
from resources.remote.protocol import make_storage_client as storage_client

pytest_plugins = ["lab_assets_tests.gce_fixtures"]
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

STEPS, EVERY = 16, 5
TRAIN = f"""
import sys
from resources.remote import preemption
preemption.install_if_preemptible()
from lab_assets.ml.train import TrainSpec, train_adapter
from resources.remote.checkpointing import preemptible_training
spec = TrainSpec(method="lora_sft", task="arith", seed=0, rank=4, alpha=8, steps={STEPS},
                 batch_size=4, n_examples=64)
r = train_adapter(sys.argv[1], sys.argv[2], spec, log=lambda m: print(m, flush=True),
                  **preemptible_training())
print("DONE", r.steps, len(r.loss_curve), flush=True)
"""


@contextlib.contextmanager
def _agent_serving(bucket, prefix: str, ckpt):
    """What the agent's flusher does while the step runs: answer its sync requests."""
    sync = CheckpointSync(bucket, prefix, ckpt)
    stop = threading.Event()

    def serve():
        while not stop.wait(0.1):
            if ckpt.is_dir():
                sync.serve_request()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield sync
    finally:
        stop.set()
        t.join()


def _attempt(base, out, ckpt, sigterm_after_step: int | None = None, kill: bool = False):
    env = {
        **os.environ,
        "LAB_CHECKPOINT_DIR": str(ckpt),
        "LAB_PREEMPTIBLE": "1",
        "LAB_CHECKPOINT_EVERY": str(EVERY),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(base), str(out)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, signalled_at = [], None
    for line in proc.stdout:
        lines.append(line.rstrip())
        m = re.match(r"lora_sft step (\d+)/", line)
        if m and sigterm_after_step and signalled_at is None:
            if int(m.group(1)) >= sigterm_after_step:
                signalled_at = int(m.group(1))
                # SIGTERM: what the agent does on preemption; SIGKILL: a VM lost at once
                proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    return proc.wait(timeout=120), lines, signalled_at


def test_train_adapter_checkpoints_on_sigterm_and_resumes_from_gcs(gcs_emulator, tmp_path):
    from lab_assets.ml.tiny_model import TinyModelSpec, build_tiny_model

    base = tmp_path / "base"
    build_tiny_model(base, TinyModelSpec(pretrain_steps=10, corpus_size=300))
    bucket = storage_client().bucket(BUCKET)
    prefix = f"train-test/{time.time_ns()}/checkpoints"

    vm1 = tmp_path / "vm1"
    with _agent_serving(bucket, prefix, vm1 / "ckpt"):
        rc, out1, signalled_at = _attempt(base, vm1 / "out", vm1 / "ckpt", sigterm_after_step=7)
    assert rc == PREEMPTED_EXIT_CODE, "\n".join(out1)
    assert signalled_at is not None
    uploaded = CheckpointSync(bucket, prefix, vm1 / "ckpt").upload()  # the agent's final flush
    saved = max(int(n.split("-")[1]) for n in uploaded)
    assert saved >= signalled_at  # saved at the end of the step in progress, not at step 5
    names = {
        b.name.rsplit("/", 1)[1] for b in bucket.list_blobs(prefix=f"{prefix}/checkpoint-{saved}/")
    }
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names

    vm2 = tmp_path / "vm2"  # a new VM: nothing local
    got = CheckpointSync(bucket, prefix, vm2 / "ckpt").download()
    assert f"checkpoint-{saved}" in got
    with _agent_serving(bucket, prefix, vm2 / "ckpt"):
        rc, out2, _ = _attempt(base, vm2 / "out", vm2 / "ckpt")
    assert rc == 0, "\n".join(out2)
    assert any(f"resuming from {vm2 / 'ckpt'}/checkpoint-{saved}" in line for line in out2)
    steps_run = [int(m.group(1)) for line in out2 if (m := re.match(r"lora_sft step (\d+)/", line))]
    assert steps_run[0] == saved + 1 and steps_run[-1] == STEPS
    assert f"DONE {STEPS} {STEPS}" in out2[-1]  # loss curve covers both attempts
    assert (vm2 / "out" / "adapter_model.safetensors").is_file()
    lost = signalled_at + 1 - (saved + 1)  # steps run twice
    assert lost <= 1


def test_a_vm_lost_without_warning_loses_at_most_one_checkpoint_interval(gcs_emulator, tmp_path):
    """SIGKILL, no SIGTERM: nothing is saved at the end. Each periodic checkpoint was made
    durable before training went on (the step waits for the agent's upload), so the new VM
    resumes from GCS at most one checkpoint interval behind."""
    from lab_assets.ml.tiny_model import TinyModelSpec, build_tiny_model

    base = tmp_path / "base"
    build_tiny_model(base, TinyModelSpec(pretrain_steps=10, corpus_size=300))
    bucket = storage_client().bucket(BUCKET)
    prefix = f"train-test/{time.time_ns()}/checkpoints"

    vm1 = tmp_path / "vm1"
    with _agent_serving(bucket, prefix, vm1 / "ckpt"):
        rc, out1, killed_at = _attempt(
            base, vm1 / "out", vm1 / "ckpt", sigterm_after_step=12, kill=True
        )
    assert rc == -signal.SIGKILL and killed_at is not None, "\n".join(out1)
    assert any("durable in" in line for line in out1)  # the step waited for the upload

    vm2 = tmp_path / "vm2"  # a new VM: only what reached GCS
    got = CheckpointSync(bucket, prefix, vm2 / "ckpt").download()
    saved = max(int(n.split("-")[1]) for n in got)
    assert killed_at - saved <= EVERY, (killed_at, got)
    with _agent_serving(bucket, prefix, vm2 / "ckpt"):
        rc, out2, _ = _attempt(base, vm2 / "out", vm2 / "ckpt")
    assert rc == 0, "\n".join(out2)
    steps_run = [int(m.group(1)) for line in out2 if (m := re.match(r"lora_sft step (\d+)/", line))]
    assert steps_run[0] == saved + 1 and steps_run[-1] == STEPS
    assert killed_at + 1 - steps_run[0] <= EVERY  # steps run twice: at most one interval
