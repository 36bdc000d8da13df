"""What `lab doctor`'s checks share: findings, the plan, the context, fix commands.

Its own module so that the checks (``doctor``: credentials, APIs, quota;
``doctor_access``: bucket and service account) import it and never each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from resources.compute.gce.gcp_admin import AdminApi

OK, WARN, FAIL = "ok", "warn", "FAIL"
REQUIRED_APIS = {
    "compute.googleapis.com": "Compute Engine",
    "storage.googleapis.com": "Cloud Storage",
}


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warn | FAIL
    check: str  # credentials | apis | quota | bucket | service account | experiment
    text: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.level:4s}  {self.check}: {self.text}" + (
            f" -> {self.fix}" if self.fix else ""
        )


@dataclass(frozen=True)
class GpuNeed:
    """One GPU type the placements use: where, and how many GPUs one VM of it takes."""

    gpu_type: str
    regions: tuple[str, ...]
    zones: tuple[str, ...]
    per_vm: int


@dataclass(frozen=True)
class DoctorPlan:
    """What the experiment needs from the project, as plain values."""

    project: str
    spot: bool
    parallelism: int  # VMs at once (sweep.max_gpu_in_flight)
    gpus: tuple[GpuNeed, ...]
    buckets: tuple[str, ...]  # gs:// roots the lab and its VMs write (storage, staging)
    experiment: str = ""
    service_account: str | None = None  # None: the project's default compute SA
    vm_self_delete: bool = True  # the VM deletes itself when idle (compute.instances.delete)
    placeholders: tuple[str, ...] = ()  # unset ${VAR:-default} in the experiment


@dataclass
class Context:
    """What the checks share: credentials, clients, what is known to be disabled."""

    plan: DoctorPlan
    credentials: Any = None
    compute: Any = None  # ComputeApi
    admin: AdminApi | None = None
    disabled: set[str] = field(default_factory=set)
    project_info: Any = None  # compute_v1.Project, once read


def enable_fix(project: str, service: str) -> str:
    return f"gcloud services enable {service} --project {project}"


def disabled_finding(ctx: Context, service: str, what: str) -> Finding:
    """The FAIL for an API found disabled by a call's answer (Service Usage unread)."""
    ctx.disabled.add(service)
    title = REQUIRED_APIS.get(service, service)
    return Finding(
        FAIL,
        "apis",
        f"{title} API is not enabled in {ctx.plan.project} ({what} answered SERVICE_DISABLED)",
        enable_fix(ctx.plan.project, service),
    )
