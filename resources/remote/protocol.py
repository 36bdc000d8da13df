"""Every name shared across the wire between the orchestrator and a worker or VM.

Standard library only at import: this file ships to the VM beside the agent
(instance metadata attribute ``lab-protocol``) and is imported there before the
lab's own code is installed. The orchestrator-side launcher, the agent, the step
worker and the asset code all take these names from here, so they cannot drift.
``make_storage_client`` imports google-cloud-storage when called (the VM image
has it; nothing else of the lab is needed).

Layout under a launch URI ``L``: ``L/bundle/*.whl``, ``L/step_run_ref.pkl``,
``L/experiment.yaml``, ``L/checkpoints/...``, and per attempt ``n``:
``L/attempts/<n>/events/<8 digits>.jsonl``, ``L/attempts/<n>/logs/<8 digits>.txt``,
``L/attempts/<n>/status.json``.
"""

from __future__ import annotations

import os
import re
from typing import Any

# -- environment the launcher / agent set for the step worker --------------------------------
SCRATCH_ENV = "LAB_SCRATCH_DIR"  # the one step's scratch directory
SCRATCH_ROOT_ENV = "LAB_SCRATCH_ROOT"  # where workers' scratch directories are made
CHECKPOINT_DIR_ENV = "LAB_CHECKPOINT_DIR"  # local checkpoints the agent mirrors to GCS
CHECKPOINT_EVERY_ENV = "LAB_CHECKPOINT_EVERY"  # optimizer steps between checkpoints
LOCAL_CHECKPOINT_ROOT_ENV = "LAB_CHECKPOINT_ROOT"  # local runs' checkpoints (kept until done)
PREEMPTIBLE_ENV = "LAB_PREEMPTIBLE"  # "1": checkpoint and stop on SIGTERM
LAUNCH_INFO_ENV = "LAB_GCE_LAUNCH_INFO"  # JSON: zone, machine type, ... of the VM
EXPERIMENT_ENV = "LAB_EXPERIMENT"  # the experiment file
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"  # google-cloud-storage's own emulator variable
PROJECT_ENV = "GOOGLE_CLOUD_PROJECT"
DEFAULT_EMULATOR_PROJECT = "lab-emulator"
TORCH_THREADS_ENV = "LAB_TORCH_THREADS"  # torch CPU threads per step worker (set_num_threads)
CONCURRENT_WORKERS_ENV = "LAB_CONCURRENT_WORKERS"  # workers sharing the cores (default 1)

# -- the local warm worker server (fork server) ----------------------------------------------
WARM_WORKERS_ENV = "LAB_WARM_WORKERS"  # "0": every local step starts a cold subprocess
WARM_SOCKET_DIR_ENV = "LAB_WARM_SOCKET_DIR"  # where servers' sockets, locks and logs live
WARM_IDLE_TIMEOUT_ENV = "LAB_WARM_IDLE_TIMEOUT_S"  # a server with no step exits after this
WARM_PRELOAD_ENV = "LAB_WARM_PRELOAD"  # comma-separated modules a server imports up front

# -- the agent's own environment -------------------------------------------------------------
METADATA_HOST_ENV = "GCE_METADATA_HOST"
HOME_ENV = "LAB_AGENT_HOME"  # where the agent works (default /opt/lab/run)
DEVICE_ROOT_ENV = "LAB_AGENT_DEVICE_ROOT"  # where attached disks appear (default /dev/disk/by-id)

# -- instance metadata attributes ------------------------------------------------------------
INSTRUCTIONS_KEY = "lab-launch"  # JSON instructions for the agent
AGENT_KEY = "lab-agent"  # the agent's source (its entry point, ``agent.py``)
PROTOCOL_KEY = "lab-protocol"  # this file's source
# Every module the agent runs with, by the attribute that ships its source; the
# startup script writes each to ``$LAB_HOME/agent/resources/remote/<file>``.
VM_MODULES = {
    PROTOCOL_KEY: "protocol.py",
    AGENT_KEY: "agent.py",
    "lab-agent-metadata": "agent_metadata.py",
    "lab-agent-sync": "agent_sync.py",
    "lab-agent-step": "agent_step.py",
    "lab-agent-image": "agent_image.py",
    "lab-agent-warm": "agent_warm.py",
    "lab-agent-compute": "agent_compute.py",
    "lab-vm-boot": "vm_boot.py",  # the first-boot helper (the image's python3 runs it)
    "lab-agent-unit": "agent_unit.py",  # the agent's systemd unit's entry point
}

# -- exit codes ------------------------------------------------------------------------------
PREEMPTED_EXIT_CODE = 75  # the worker checkpointed and stopped because of a preemption

# -- the launch layout in GCS ----------------------------------------------------------------
BUNDLE_DIR = "bundle"
STEP_RUN_REF = "step_run_ref.pkl"
EXPERIMENT_FILE = "experiment.yaml"
CHECKPOINTS_DIR = "checkpoints"
# A checkpoint counts once it is in GCS: the step writes the checkpoint's name to
# SYNC_REQUEST (in its checkpoint dir) and waits until the agent, having uploaded it,
# writes the same name to SYNC_DONE. Dot-files: never uploaded as checkpoint content.
SYNC_REQUEST = ".sync-request"
SYNC_DONE = ".synced"
CHECKPOINT_SYNC_TIMEOUT_ENV = "LAB_CHECKPOINT_SYNC_TIMEOUT_S"  # the step's wait (default 600)
EVENTS_DIR = "events"
LOGS_DIR = "logs"
STATUS_FILE = "status.json"
BOOT_FILE = "boot.json"  # per attempt: the first boot's phases (``vm_boot``), before the agent

# -- the agent as a systemd unit on the VM (``agent_unit``; the startup and shutdown scripts) --
AGENT_UNIT = "lab-agent.service"
AGENT_PID_FILE = "agent.pid"  # in the agent's home: the unit's main process
AGENT_EXITED_FILE = "agent.exited"  # written last: everything the agent had is durable
AGENT_LOG_FILE = "agent.log"  # the agent's own output, also in the journal and on the console

# -- warm VMs, orchestrator leases and the in-flight index, under the staging root ----------
# ``<staging>/_gce/leases/<id>.json``: an orchestrator's heartbeat ({"t": ...}); a VM stays
# warm after a step only while some lease is fresher than ``lease_ttl_s``.
# ``<staging>/_gce/vms/<vm>.json``: a VM's life record, rewritten at each agent heartbeat
# ({"state": VM_STATES, "t", "idle_until", "deadline", ...}); the reaper judges by it.
# ``<staging>/_gce/warm/offers/<shape>/<vm>.json``: an idle VM on offer (with its ``seq``);
# ``<staging>/_gce/warm/claims/<vm>/<seq>.json``: created once (ifGenerationMatch=0) by a
# launcher (``{"step": instructions}``) or by the VM retiring (``{"retire": ...}``): exactly
# one of them wins each idle period.
# ``<staging>/_gce/inflight/<key>.json``: the launch that owns a partition's recipe.
LEASES_DIR = "_gce/leases"
VMS_DIR = "_gce/vms"
OFFERS_DIR = "_gce/warm/offers"
CLAIMS_DIR = "_gce/warm/claims"
INFLIGHT_DIR = "_gce/inflight"
VM_WORKING, VM_IDLE, VM_DONE, VM_RETIRING, VM_PREEMPTED = (
    "working",
    "idle",
    "done",
    "retiring",
    "preempted",
)
TOKEN_PATH = "instance/service-accounts/default/token"  # the metadata server's access token
DEFAULT_COMPUTE_ENDPOINT = "https://compute.googleapis.com"


def instance_path(project: str, zone: str, name: str) -> str:
    """The REST path of an instance (``/compute/v1/...``), as the Compute API spells it."""
    return f"/compute/v1/projects/{project}/zones/{zone}/instances/{name}"


def attempt_prefix(launch_prefix: str, attempt: int) -> str:
    return f"{launch_prefix.rstrip('/')}/attempts/{attempt}"


def chunk_name(prefix: str, index: int, suffix: str) -> str:
    """The `index`-th object of a stream (GCS objects are immutable: a stream is a sequence)."""
    return f"{prefix}/{index:08d}.{suffix}"


# -- gs:// URIs and the storage client -------------------------------------------------------
_GS_URI = re.compile(r"^gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(?:/(.*))?$")


class GsUriError(ValueError):
    """Not a `gs://bucket[/prefix]` URI; the message quotes it."""


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/some/prefix` -> ("bucket", "some/prefix"); the prefix has no edge slashes."""
    m = _GS_URI.match(uri)
    if not m:
        raise GsUriError(
            f"{uri!r} is not a gs://bucket[/prefix] URI (bucket: 3-222 characters of "
            "a-z, 0-9, '.', '_', '-', starting and ending with a letter or digit)"
        )
    return m.group(1), (m.group(2) or "").strip("/")


def emulator_host() -> str | None:
    """The emulator's base URL from `STORAGE_EMULATOR_HOST`, with a scheme, or None."""
    host = os.environ.get(EMULATOR_ENV, "").strip()
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


def make_storage_client(project: str | None = None, *, endpoint: str | None = None) -> Any:
    """The one way the lab makes a GCS client.

    Against an emulator (`endpoint`, else `STORAGE_EMULATOR_HOST`): anonymous. Else
    Application Default Credentials (a VM's service account, `gcloud auth
    application-default login`, or `GOOGLE_APPLICATION_CREDENTIALS`). Raises
    google.auth's `DefaultCredentialsError` when there are none.
    """
    from google.cloud import storage

    project = project or os.environ.get(PROJECT_ENV) or None
    endpoint = endpoint or emulator_host()
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=project or DEFAULT_EMULATOR_PROJECT,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": endpoint.rstrip("/")},
        )
    return storage.Client(project=project)
