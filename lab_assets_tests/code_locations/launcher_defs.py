"""A small code location for step-launcher tests: no torch, so workers start fast.

Its assets misbehave on request (fail, crash the worker, get SIGKILLed, hang,
wait for an acknowledgement) through their run config, so each launcher behaviour
is a real run through the real launcher. Mode ``torch`` imports torch inside the
step and trains a tiny linear model, to prove torch works in a worker forked by
the warm worker server (it logs whether torch was already imported: preloaded).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

from dagster import AssetExecutionContext, Config, Definitions, asset, in_process_executor

from lab_assets_tests.handshake import wait_for_ack
from resources.compute.local.launcher import LocalStepLauncher
from resources.io_manager import ArtifactIOManager, LabStorage
from resources.remote.protocol import SCRATCH_ENV


class WorkConfig(Config):
    mode: str = "ok"  # ok | fail | crash | sigkill | sigterm | hang | handshake | torch
    handshake_dir: str = ""


@asset(required_resource_keys={"step_launcher"})
def remote_work(context: AssetExecutionContext, config: WorkConfig):
    scratch = Path(os.environ[SCRATCH_ENV])
    context.log.info(f"worker pid {os.getpid()} ppid {os.getppid()} scratch {scratch}")
    (scratch / "out").mkdir()
    (scratch / "out" / "result.txt").write_text("done")
    if config.mode == "handshake":
        wait_for_ack(context, config.handshake_dir)
    if config.mode == "fail":
        raise ValueError("asset failed on purpose")
    if config.mode == "crash":
        os._exit(3)
    if config.mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if config.mode == "sigterm":  # what a terminated run's launcher (or systemd) sends
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the interrupt lands here
    if config.mode == "hang":
        _hang(scratch, config.handshake_dir)
    if config.mode == "torch":
        context.log.info(_train_tiny_model())
    return scratch / "out"


def _hang(scratch: Path, handshake_dir: str) -> None:
    """Say who we are in `<handshake_dir>/worker.json`, then wait to be killed."""
    info = {"pid": os.getpid(), "ppid": os.getppid(), "scratch": str(scratch.parent)}
    tmp = Path(handshake_dir) / "worker.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.rename(Path(handshake_dir) / "worker.json")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.1)


def _train_tiny_model() -> str:
    preloaded = "torch" in sys.modules
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return (
        f"torch ok preloaded={preloaded} threads={torch.get_num_threads()} "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    )


storage = LabStorage(root=os.environ.get("LAB_STORAGE_ROOT", "/nonexistent"), experiment="launcher")
defs = Definitions(
    assets=[remote_work],
    resources={
        "step_launcher": LocalStepLauncher(),
        "lab_storage": storage,
        "io_manager": ArtifactIOManager(storage=storage),
    },
    executor=in_process_executor,
)
