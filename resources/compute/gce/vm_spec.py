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


# What the fallback bootstrap installs on a Deep Learning VM image (Ubuntu 22.04, its own
# Python 3.10, NVIDIA driver 570, so CUDA <= 12.8): a standalone CPython 3.11 through a pinned
# uv (the image's 3.10 and its packages are never used: a 3.11 interpreter cannot import
# them), and torch's CUDA 12.8 build at the version pyproject.toml pins, from PyTorch's own
# index, before the bundle (whose `torch==<version>` that build then satisfies).
UV_VERSION = "0.13.8"
PYTHON_VERSION = "3.11"
TORCH_VERSION = "2.13.0"  # == pyproject.toml's torch pin (a test checks)
TORCH_CUDA = "cu128"
TORCH_INDEX = f"https://download.pytorch.org/whl/{TORCH_CUDA}"
MIN_DRIVER_MAJOR = 570  # CUDA 12.8 needs an NVIDIA driver >= 570
DRIVER_WAIT_S = 600  # how long the bootstrap waits for the driver (first-boot install)
SHUTDOWN_WAIT_S = 25  # how long the shutdown script waits for the agent's checkpoint

# The system python3 runs the first-boot helper (``resources/remote/vm_boot.py``) from the
# agent's modules, before any venv exists.
VM_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from resources.remote.vm_boot import main; sys.exit(main())"
)

_STARTUP = r"""#!/bin/bash
# Written by the lab's GCE launcher. It holds no experiment values: the agent reads
# its instructions from the instance metadata attribute '@INSTRUCTIONS@'.
# Each phase's output goes to the console and to $LAB_HOME/boot/<phase>.log; its start,
# end or failure (with the output's tail) goes to GCS at once (vm_boot.py report).
set -uo pipefail
export HOME=${HOME:-/root}
LAB_HOME=${LAB_HOME:-@HOME@}
UNIT_DIR=${LAB_UNIT_DIR:-/etc/systemd/system}
PCI_DEVICES=${LAB_PCI_DEVICES:-/sys/bus/pci/devices}
MD="http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1/instance/attributes"
AGENT_DIR="$LAB_HOME/agent/resources/remote"
BOOT="$LAB_HOME/boot"
VENV="$LAB_HOME/venv"
UV="$LAB_HOME/uv/uv"
export LAB_HOME UV_CACHE_DIR="$LAB_HOME/uv-cache" UV_PYTHON_INSTALL_DIR="$LAB_HOME/python"
export UV_PYTHON_PREFERENCE=only-managed UV_NO_PROGRESS=1
rm -rf "$LAB_HOME/agent" "$BOOT"
mkdir -p "$AGENT_DIR" "$BOOT" || exit 1
touch "$LAB_HOME/agent/resources/__init__.py" "$AGENT_DIR/__init__.py" || exit 1
fetch() {  # fetch ATTRIBUTE FILE: one of the agent's modules, from instance metadata
  curl -fsS -H 'Metadata-Flavor: Google' "$MD/$1" -o "$AGENT_DIR/$2" \
    || { echo "startup-script: cannot fetch metadata attribute $1" >&2; exit 1; }
}
@FETCH@
report() {
  python3 -c @VM_BOOT@ "$LAB_HOME/agent" report "$@" \
    || echo "startup-script: could not report $*" >&2
}
phase() {  # phase NAME COMMAND...: run one step of the boot, report it, stop the boot if it fails
  local name=$1 rc
  shift
  report "$name" start
  echo "startup-script: $name: $*"
  "$@" 2>&1 | tee -a "$BOOT/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "startup-script: $name failed (exit $rc)" >&2
    report "$name" failed --log "$BOOT/$name.log" --detail "exit $rc"
    exit 1
  fi
  report "$name" done --detail "$(tail -n 1 "$BOOT/$name.log" | cut -c1-200)"
}
has_gpu() { grep -qsx 0x10de "$PCI_DEVICES"/*/vendor; }
wait_for_driver() {  # the image's driver (or the one its first boot installs) must serve CUDA 12.8
  local deadline=$((SECONDS + @DRIVER_WAIT@)) version
  until nvidia-smi -L; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "no NVIDIA driver after @DRIVER_WAIT@s"; return 1; }
    sleep 5
  done
  version=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)
  case ${version%%.*} in
    '' | *[!0-9]*) echo "cannot read the NVIDIA driver's version: '$version'"; return 1 ;;
  esac
  if [ "${version%%.*}" -lt @MIN_DRIVER@ ]; then
    echo "NVIDIA driver $version is older than @MIN_DRIVER@: torch @TORCH@+@CUDA@ needs CUDA 12.8"
    return 1
  fi
  echo "NVIDIA driver $version"
}
install_uv() {
  curl -LsSf @UV_URL@ | env UV_UNMANAGED_INSTALL="$LAB_HOME/uv" sh && "$UV" --version
}
make_venv() {
  rm -rf "$VENV" && "$UV" venv --python @PYTHON@ --seed "$VENV" && "$VENV/bin/python" --version
}
if [ -x "$VENV/bin/python" ] && [ ! -e "$LAB_HOME/.bootstrap-incomplete" ]; then
  report prebaked skipped --detail "$VENV exists: no bootstrap"
else
  # Bootstrap (Deep Learning VM image): a Python @PYTHON@ of its own (no apt: the image's
  # first-boot services hold the dpkg lock, and its Python is 3.10), torch's CUDA build,
  # the agent's one dependency; the agent then pip-installs the bundle with the rest.
  touch "$LAB_HOME/.bootstrap-incomplete"
  if has_gpu; then
    phase driver wait_for_driver
  else
    report driver skipped --detail "no NVIDIA device on the PCI bus"
  fi
  phase uv install_uv
  phase python "$UV" python install @PYTHON@
  phase venv make_venv
  phase torch "$UV" pip install --python "$VENV/bin/python" --index-url @TORCH_INDEX@ @TORCH_REQ@
  phase agent-deps "$UV" pip install --python "$VENV/bin/python" @STORAGE_PIN@
  rm -f "$LAB_HOME/.bootstrap-incomplete"
fi
# The agent runs as a systemd unit of its own, not as this script's child: the runner
# of startup scripts is a oneshot service whose stop would take the agent's output with it.
write_unit() {
  mkdir -p "$UNIT_DIR" && mkdir -p "$LAB_HOME/run" \
    && python3 -c @VM_BOOT@ "$LAB_HOME/agent" unit --home "$LAB_HOME" > "$UNIT_DIR/@UNIT@" \
    && systemctl daemon-reload && systemctl start @UNIT@ && echo "@UNIT@ started"
}
phase agent write_unit
"""

_SHUTDOWN = r"""#!/bin/bash
# Written by the lab's GCE launcher. GCE runs it when the VM is preempted, stopped or
# deleted (then, for a spot VM, about 30 s before the power goes): it asks the lab agent to
# checkpoint and stop, as on SIGTERM, and waits up to @WAIT@ s for it to say that all it had
# is in GCS (the file @EXITED@) or to exit.
LAB_HOME=${LAB_HOME:-@HOME@}
RUN="$LAB_HOME/run"
pid=$(cat "$RUN/@PID@" 2>/dev/null) || { echo "shutdown-script: no lab agent"; exit 0; }
if [ -e "$RUN/@EXITED@" ] || ! kill -TERM "$pid" 2>/dev/null; then
  echo "shutdown-script: the lab agent has already stopped"
  exit 0
fi
echo "shutdown-script: asked the lab agent (pid $pid) to checkpoint and stop"
deadline=$((SECONDS + @WAIT@))
while [ ! -e "$RUN/@EXITED@" ] && kill -0 "$pid" 2>/dev/null; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "shutdown-script: the lab agent is still running after @WAIT@s"
    exit 0
  fi
  sleep 0.2
done
echo "shutdown-script: the lab agent stopped ($(cat "$RUN/@EXITED@" 2>/dev/null || echo gone))"
"""


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    leftover = sorted(set(re.findall(r"@[A-Z_]+@", template)))
    if leftover:
        raise ValueError(f"unfilled placeholders in a VM script: {leftover}")
    return template


def startup_script(lab_home: str = DEFAULT_LAB_HOME, storage_pin: str = STORAGE_PIN) -> str:
    """The VM's startup script: fetch the agent's modules, bootstrap if needed, start the agent.

    The agent's modules (``protocol.VM_MODULES``) are laid out afresh at each boot as
    the package ``$LAB_HOME/agent/resources/remote`` (empty ``__init__.py`` files).
    On the pre-baked image ``$LAB_HOME/venv`` exists with the lab's dependencies; on a
    Deep Learning VM image the first boot makes it (phases ``driver``, ``uv``,
    ``python``, ``venv``, ``torch``, ``agent-deps``, each reported to GCS by
    ``vm_boot``), and the agent pip-installs the bundle into it. Last, phase
    ``agent``: the agent's systemd unit (``vm_boot.unit``) is written and started.
    Every value the script holds is ``shlex.quote``d; none comes from the experiment.
    """
    q = shlex.quote
    fetch = "\n".join(
        # attribute and file names are fixed identifiers, never config values
        f"fetch {q(key)} {q(name)}"
        for key, name in protocol.VM_MODULES.items()
    )
    return _fill(
        _STARTUP,
        {
            "INSTRUCTIONS": protocol.INSTRUCTIONS_KEY,
            "HOME": q(lab_home),
            "FETCH": fetch,
            "VM_BOOT": q(VM_BOOT),
            "DRIVER_WAIT": str(int(DRIVER_WAIT_S)),
            "MIN_DRIVER": str(int(MIN_DRIVER_MAJOR)),
            "TORCH": TORCH_VERSION,
            "CUDA": TORCH_CUDA,
            "UV_URL": q(f"https://astral.sh/uv/{UV_VERSION}/install.sh"),
            "PYTHON": q(PYTHON_VERSION),
            "TORCH_INDEX": q(TORCH_INDEX),
            "TORCH_REQ": q(f"torch=={TORCH_VERSION}+{TORCH_CUDA}"),
            "STORAGE_PIN": q(storage_pin),
            "UNIT": protocol.AGENT_UNIT,
        },
    )


def shutdown_script(lab_home: str = DEFAULT_LAB_HOME, wait_s: int = SHUTDOWN_WAIT_S) -> str:
    """The VM's shutdown script: the agent checkpoints and stops before the VM goes."""
    return _fill(
        _SHUTDOWN,
        {
            "HOME": shlex.quote(lab_home),
            "WAIT": str(int(wait_s)),
            "PID": protocol.AGENT_PID_FILE,
            "EXITED": protocol.AGENT_EXITED_FILE,
        },
    )


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
        "shutdown-script": shutdown_script(spec.lab_home),
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
