"""A small code location for step-launcher tests: no torch, so workers start fast.

Its assets misbehave on request (fail, crash the worker, wait for an
acknowledgement) through their run config, so each launcher behaviour is a real
run through the real launcher.
"""

import os
from pathlib import Path

from dagster import AssetExecutionContext, Config, Definitions, asset, in_process_executor

from lab_assets_tests.handshake import wait_for_ack
from resources.compute.local.launcher import LocalStepLauncher
from resources.io_manager import ArtifactIOManager, LabStorage
from resources.remote.protocol import SCRATCH_ENV


class WorkConfig(Config):
    mode: str = "ok"  # ok | fail | crash | handshake
    handshake_dir: str = ""


@asset(required_resource_keys={"step_launcher"})
def remote_work(context: AssetExecutionContext, config: WorkConfig):
    scratch = Path(os.environ[SCRATCH_ENV])
    context.log.info(f"worker pid {os.getpid()} scratch {scratch}")
    (scratch / "out").mkdir()
    (scratch / "out" / "result.txt").write_text("done")
    if config.mode == "handshake":
        wait_for_ack(context, config.handshake_dir)
    if config.mode == "fail":
        raise ValueError("asset failed on purpose")
    if config.mode == "crash":
        os._exit(3)
    return scratch / "out"


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
