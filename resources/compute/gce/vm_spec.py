"""The ``instances.insert`` body for a lab VM: hardware, scheduling, labels, metadata.

Everything that says what the VM should do goes into instance metadata as JSON
(attribute ``lab-launch``) next to the agent's own source (``lab-agent``); the
startup script is a fixed text that fetches the agent from the metadata server
and runs it. No partition key, run id or config value is ever pasted into the
script, and the few values it does hold (install paths, the pinned
google-cloud-storage) are ``shlex.quote``d, so shell metacharacters in any of
them stay inert.

Scheduling is the dead-man switch: every VM carries ``maxRunDuration`` with
``instanceTerminationAction: DELETE``, so it cannot outlive a lost orchestrator.
Spot VMs use ``provisioningModel: SPOT``; on-demand GPU VMs must use
``onHostMaintenance: TERMINATE`` (GPUs cannot live-migrate).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resources.remote import protocol

if TYPE_CHECKING:
    from google.cloud import compute_v1

MANAGED_LABEL = "lab-managed"
KEEP_UNTIL_LABEL = "lab-keep-until"
DEFAULT_LAB_HOME = "/opt/lab"
STORAGE_PIN = "google-cloud-storage==3.17.1"
# A Deep Learning VM image family for when the pre-baked image is missing.
DLVM_PROJECT = "deeplearning-platform-release"
DLVM_FAMILY = "common-cu128-ubuntu-2204-nvidia-570"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def label_value(raw: str) -> str:
    """A string made a valid label value: lowercase [a-z0-9_-], at most 63 characters.

    Anything else becomes `_`; a value that had to be cut keeps a short hash of the
    original so two long keys do not collide.
    """
    v = re.sub(r"[^a-z0-9_-]", "_", str(raw).lower())
    if len(v) > 63:
        v = f"{v[:54]}-{hashlib.sha256(str(raw).encode()).hexdigest()[:8]}"
    return v


def labels(**values: str) -> dict[str, str]:
    out = {}
    for k, v in values.items():
        key = k.replace("_", "-")
        if not _LABEL_KEY.match(key):
            raise ValueError(f"{key!r} is not a valid label key")
        out[key] = label_value(v)
    return out


def vm_name(experiment: str, run_id: str, step_key: str, attempt: int) -> str:
    """`lab-<experiment>-<run>-<step hash>-a<attempt>`, a valid instance name (<= 63)."""
    exp = re.sub(r"[^a-z0-9-]", "-", experiment.lower()).strip("-")[:24] or "x"
    run = re.sub(r"[^a-z0-9]", "", run_id.lower())[:8] or "run"
    step = hashlib.sha256(step_key.encode()).hexdigest()[:6]
    name = f"lab-{exp}-{run}-{step}-a{attempt}"
    return re.sub(r"-+", "-", name)[:63].rstrip("-")


# The agent's entry point: its modules' directory goes first on ``sys.path`` only
# (not on PYTHONPATH, not as the working directory), so the processes it starts (pip,
# the step worker, the health check) see the installed bundle, never those stubs.
AGENT_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from resources.remote.agent import main; sys.exit(main())"
)


def startup_script(lab_home: str = DEFAULT_LAB_HOME, storage_pin: str = STORAGE_PIN) -> str:
    """The VM's startup script: fetch the agent from metadata, bootstrap if needed, run it.

    The agent's modules (``protocol.VM_MODULES``) are laid out afresh at each boot
    as the package ``$LAB_HOME/agent/resources/remote`` (empty ``__init__.py``
    files), and the agent runs from ``$LAB_HOME`` with ``AGENT_BOOT``.
    On the pre-baked image ``<lab_home>/venv`` exists with the lab's dependencies;
    on a Deep Learning VM image the first boot makes it (with the image's torch and
    CUDA via system site packages) and the agent pip-installs the bundle into it.
    """
    home = shlex.quote(lab_home)
    pin = shlex.quote(storage_pin)
    fetch = "\n".join(
        # attribute and file names are fixed identifiers, never config values
        f'curl -fsS -H \'Metadata-Flavor: Google\' "$MD/{key}" -o "$AGENT_DIR/{name}"'
        for key, name in protocol.VM_MODULES.items()
    )
    return f"""#!/bin/bash
# Written by the lab's GCE launcher. It holds no experiment values: the agent reads
# its instructions from the instance metadata attribute '{protocol.INSTRUCTIONS_KEY}'.
set -euo pipefail
LAB_HOME=${{LAB_HOME:-{home}}}
MD="http://${{GCE_METADATA_HOST:-metadata.google.internal}}/computeMetadata/v1/instance/attributes"
AGENT_DIR="$LAB_HOME/agent/resources/remote"
rm -rf "$LAB_HOME/agent"
mkdir -p "$AGENT_DIR"
touch "$LAB_HOME/agent/resources/__init__.py" "$AGENT_DIR/__init__.py"
{fetch}
if [ ! -x "$LAB_HOME/venv/bin/python" ]; then
  # Bootstrap (Deep Learning VM image): Python 3.11 and a venv; the agent then
  # pip-installs the bundle with its dependencies (torch with its CUDA runtime).
  if ! command -v python3.11 >/dev/null; then
    apt-get update -q && apt-get install -y -q python3.11 python3.11-venv
  fi
  python3.11 -m venv --system-site-packages "$LAB_HOME/venv"
  "$LAB_HOME/venv/bin/python" -m pip install -q --upgrade pip {pin}
fi
cd "$LAB_HOME"
LAB_AGENT_HOME="$LAB_HOME/run" exec "$LAB_HOME/venv/bin/python" -u \\
  -c {shlex.quote(AGENT_BOOT)} "$LAB_HOME/agent"
"""


def _remote_source(name: str) -> str:
    """A VM-side module's source, read as a file: the launcher never imports the agent."""
    return (Path(__file__).resolve().parents[2] / "remote" / name).read_text()


def vm_module_sources() -> dict[str, str]:
    """The agent's modules' sources by the metadata attribute that ships each."""
    return {key: _remote_source(name) for key, name in protocol.VM_MODULES.items()}


@dataclass(frozen=True)
class VmSpec:
    """Everything that shapes one VM's insert body."""

    project: str
    zone: str
    name: str
    machine_type: str
    source_image: str
    gpu_type: str | None = None
    gpu_count: int = 0
    spot: bool = True
    boot_disk_gb: int = 100
    max_run_duration_s: int = 4 * 3600
    service_account: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    instructions: dict[str, Any] = field(default_factory=dict)
    extra_metadata: dict[str, str] = field(default_factory=dict)
    extra_disks: tuple[tuple[str, str], ...] = ()  # (device name, disk source link)
    network: str = "global/networks/default"
    subnetwork: str | None = None
    external_ip: bool = True  # without one: Cloud NAT / Private Google Access must be in place
    lab_home: str = DEFAULT_LAB_HOME


def build_instance(spec: VmSpec) -> compute_v1.Instance:
    """The `compute_v1.Instance` to send to `instances.insert`."""
    from google.cloud import compute_v1  # slow to import: only when a body is built

    zone = spec.zone
    accelerators = []
    if spec.gpu_type and spec.gpu_count:
        accelerators.append(
            compute_v1.AcceleratorConfig(
                accelerator_type=f"zones/{zone}/acceleratorTypes/{spec.gpu_type}",
                accelerator_count=spec.gpu_count,
            )
        )
    scheduling = compute_v1.Scheduling(
        # The dead-man switch: GCE deletes the VM after this long, whatever happens.
        max_run_duration=compute_v1.Duration(seconds=int(spec.max_run_duration_s)),
        instance_termination_action="DELETE",
    )
    if spec.spot:
        scheduling.provisioning_model = "SPOT"
        scheduling.automatic_restart = False
        scheduling.on_host_maintenance = "TERMINATE"
    else:
        scheduling.provisioning_model = "STANDARD"
        scheduling.automatic_restart = True
        if accelerators:
            scheduling.on_host_maintenance = "TERMINATE"
    items = {
        "startup-script": startup_script(spec.lab_home),
        **vm_module_sources(),
        protocol.INSTRUCTIONS_KEY: json.dumps(spec.instructions, sort_keys=True),
        **spec.extra_metadata,
    }
    disks = [
        compute_v1.AttachedDisk(
            boot=True,
            auto_delete=True,
            device_name="boot",
            initialize_params=compute_v1.AttachedDiskInitializeParams(
                disk_name=spec.name,
                source_image=spec.source_image,
                disk_size_gb=spec.boot_disk_gb,
                disk_type=f"zones/{zone}/diskTypes/pd-balanced",
            ),
        )
    ]
    for device, source in spec.extra_disks:
        disks.append(
            compute_v1.AttachedDisk(
                boot=False, auto_delete=False, device_name=device, source=source, mode="READ_ONLY"
            )
        )
    return compute_v1.Instance(
        name=spec.name,
        machine_type=f"zones/{zone}/machineTypes/{spec.machine_type}",
        guest_accelerators=accelerators,
        scheduling=scheduling,
        labels={**spec.labels, MANAGED_LABEL: "true"},
        metadata=compute_v1.Metadata(
            items=[compute_v1.Items(key=k, value=v) for k, v in items.items()]
        ),
        disks=disks,
        network_interfaces=[_network_interface(spec)],
        service_accounts=[
            compute_v1.ServiceAccount(email=spec.service_account or "default", scopes=list(SCOPES))
        ],
    )


def _network_interface(spec: VmSpec) -> compute_v1.NetworkInterface:
    """The network (and subnetwork), with an external IP for pip and the Hub unless turned off
    (then the VM reaches them through Cloud NAT / Private Google Access)."""
    from google.cloud import compute_v1

    nic = compute_v1.NetworkInterface(network=spec.network)
    if spec.subnetwork:
        nic.subnetwork = spec.subnetwork
    if spec.external_ip:
        nic.access_configs = [compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
    return nic


def instance_json(instance: compute_v1.Instance) -> str:
    """The body as the REST API sees it (camelCase field names), for `--dry-run`."""
    from google.cloud import compute_v1

    return compute_v1.Instance.to_json(
        instance,
        use_integers_for_enums=False,
        including_default_value_fields=False,
        indent=2,
    )
