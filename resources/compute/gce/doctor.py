"""`lab doctor`: is this project ready for a GCE experiment? One line per finding.

A first launch on a fresh project fails in a dozen ways that all look alike from the
launcher (a 403, a ``QUOTA_EXCEEDED`` in every zone, a VM whose first status write
is refused twenty minutes in). Each check here answers one question and, when the
answer is no, says the exact command that fixes it:

- credentials: Application Default Credentials found and a token refreshed;
- APIs: Compute Engine and Cloud Storage enabled (Service Usage; else read from the
  ``SERVICE_DISABLED`` / ``accessNotConfigured`` answers of the calls below);
- quota: ``GPUS_ALL_REGIONS`` (``projects.get``) and, per region the placements use,
  the GPU type's regional quota (``regions.get``; spot VMs use the preemptible
  quota where the project has one, else the standard one), against what the
  experiment runs at once: ``sweep.max_gpu_in_flight`` VMs x GPUs per VM;
- bucket and service account: ``doctor_access``.

A finding is ``ok``, ``warn`` (works, but costs or degrades) or ``FAIL``; any FAIL
makes the exit non-zero. Known failures (HTTP errors, missing credentials) become
findings, never tracebacks. Inputs are plain values (``DoctorPlan``): the CLI builds
them from the experiment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from resources.compute.gce.doctor_access import check_access
from resources.compute.gce.doctor_findings import (
    FAIL,
    OK,
    REQUIRED_APIS,
    WARN,
    Context,
    DoctorPlan,
    Finding,
    GpuNeed,
    disabled_finding,
    enable_fix,
)
from resources.compute.gce.gcp_admin import AdminApi, AdminError

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
LOGIN = (
    "gcloud auth application-default login (or set GOOGLE_APPLICATION_CREDENTIALS to a "
    "service-account key file kept outside the repository)"
)
# GCE quota metrics of each GPU type (regional; PREEMPTIBLE_<metric> for spot).
GPU_METRICS = {
    "nvidia-l4": "NVIDIA_L4_GPUS",
    "nvidia-tesla-a100": "NVIDIA_A100_GPUS",
    "nvidia-a100-80gb": "NVIDIA_A100_80GB_GPUS",
    "nvidia-h100-80gb": "NVIDIA_H100_GPUS",
    "nvidia-tesla-t4": "NVIDIA_T4_GPUS",
    "nvidia-tesla-v100": "NVIDIA_V100_GPUS",
}


def gpu_needs(placements: list[Any]) -> tuple[GpuNeed, ...]:
    """GpuNeeds from the launcher's placements (zone, machine_type, gpu_type, gpu_count)."""
    by_type: dict[str, list[Any]] = {}
    for p in placements:
        if p.gpu_type and p.gpu_count:
            by_type.setdefault(p.gpu_type, []).append(p)
    out = []
    for gpu, ps in by_type.items():
        zones = tuple(dict.fromkeys(p.zone for p in ps))
        regions = tuple(dict.fromkeys(z.rsplit("-", 1)[0] for z in zones))
        out.append(GpuNeed(gpu, regions, zones, max(p.gpu_count for p in ps)))
    return tuple(out)


def quota_fix(project: str, metric: str, value: int, region: str | None = None) -> str:
    quota_id = metric.replace("_", "-") + ("-per-project-region" if region else "-per-project")
    dims = f" --dimensions=region={region}" if region else ""
    return (
        f"gcloud quotas preferences create --service=compute.googleapis.com "
        f"--quota-id={quota_id} --preferred-value={value}{dims} --project={project} "
        f"(or https://console.cloud.google.com/iam-admin/quotas?project={project})"
    )


# -- credentials ------------------------------------------------------------------------


def check_credentials(ctx: Context) -> list[Finding]:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError, RefreshError, TransportError
    from google.auth.transport.requests import Request

    try:
        creds, adc_project = google.auth.default(scopes=SCOPES)
    except DefaultCredentialsError as e:
        why = (str(e).strip().splitlines() or ["none found"])[0].rstrip(".")
        return [Finding(FAIL, "credentials", f"no Application Default Credentials ({why})", LOGIN)]
    who = _who(creds)
    try:
        creds.refresh(Request())
    except (RefreshError, TransportError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return [Finding(FAIL, "credentials", f"{who} could not get a token ({why})", LOGIN)]
    ctx.credentials = creds
    extra = ""
    if adc_project and adc_project != ctx.plan.project:
        extra = f"; their default project is {adc_project}, the experiment's {ctx.plan.project}"
    return [Finding(OK, "credentials", f"{who}, token refreshed{extra}")]


def _who(creds: Any) -> str:
    email = getattr(creds, "service_account_email", None)
    kind = type(creds).__module__
    if "compute_engine" in kind:
        return "this VM's service account (metadata server)"
    if email and email != "default":
        return f"service account {email}"
    if kind.startswith("google.oauth2.credentials"):
        return "your user account (gcloud auth application-default login)"
    return f"{type(creds).__name__} credentials"


# -- APIs -------------------------------------------------------------------------------


def check_apis(ctx: Context) -> list[Finding]:
    project = ctx.plan.project
    try:
        states = ctx.admin.service_states([*REQUIRED_APIS, "iam.googleapis.com"])
    except AdminError as e:
        fix = ""
        if "quota project" in e.message:
            fix = f"gcloud auth application-default set-quota-project {project}"
        return [
            Finding(
                WARN,
                "apis",
                f"could not read which APIs are enabled ({e.status} {e.reason}); the checks "
                "below say if Compute Engine or Cloud Storage refuses as disabled",
                fix,
            )
        ]
    out = []
    for service, title in REQUIRED_APIS.items():
        if states.get(service) == "ENABLED":
            out.append(Finding(OK, "apis", f"{title} API enabled"))
        else:
            ctx.disabled.add(service)
            out.append(
                Finding(
                    FAIL,
                    "apis",
                    f"{title} API is not enabled in {project}",
                    enable_fix(project, service),
                )
            )
    if states.get("iam.googleapis.com") != "ENABLED":
        ctx.disabled.add("iam.googleapis.com")
        out.append(
            Finding(
                WARN,
                "apis",
                f"IAM API is not enabled in {project}: the service-account checks below are "
                "limited to IAM policies",
                enable_fix(project, "iam.googleapis.com"),
            )
        )
    return out


# -- quota ------------------------------------------------------------------------------


def _quotas(resource: Any) -> dict[str, Any]:
    return {q.metric: q for q in resource.quotas}


def check_quota(ctx: Context) -> list[Finding]:
    from resources.compute.gce.errors import GceApiError

    plan, api = ctx.plan, ctx.compute
    if not plan.gpus:
        return [Finding(OK, "quota", "the experiment's VMs take no GPU")]
    per_vm = max(g.per_vm for g in plan.gpus)
    need = plan.parallelism * per_vm
    try:
        ctx.project_info = api.get_project()
    except GceApiError as e:
        return [_compute_error(ctx, e, "projects.get")]
    out = []
    total = _quotas(ctx.project_info).get("GPUS_ALL_REGIONS")
    limit = int(total.limit) if total is not None else 0
    in_use = int(total.usage) if total is not None else 0
    busy = f"; {in_use} in use now" if in_use else ""
    if limit < need:
        can = limit // per_vm
        what = (
            "no GPU VM can start"
            if can == 0
            else f"only {can} of the {plan.parallelism} VMs at once can start "
            f"(or set sweep.max_gpu_in_flight: {can})"
        )
        out.append(
            Finding(
                FAIL,
                "quota",
                f"GPUS_ALL_REGIONS is {limit} in {plan.project}: {what}; the experiment "
                f"runs {plan.parallelism} VM(s) x {per_vm} GPU(s){busy}",
                quota_fix(plan.project, "GPUS_ALL_REGIONS", need),
            )
        )
    else:
        out.append(Finding(OK, "quota", f"GPUS_ALL_REGIONS {limit} >= {need} needed{busy}"))
    vms, regional, usable = 0, [], []
    read: dict[str, dict[str, Any]] = {}
    for g in plan.gpus:
        for region in g.regions:
            try:
                if region not in read:
                    read[region] = _quotas(api.get_region(region))
            except GceApiError as e:
                return [*out, _compute_error(ctx, e, f"regions.get {region}")]
            quotas = read[region]
            metric, lim = _regional_limit(quotas, g.gpu_type, plan.spot)
            fits = lim // g.per_vm
            vms += fits
            zones = ", ".join(z for z in g.zones if z.startswith(region + "-"))
            if fits:
                usable.append(f"{g.gpu_type} in {region} ({metric} {lim})")
            else:
                regional.append(
                    Finding(
                        WARN,
                        "quota",
                        f"{metric} is {lim} in {region}: the {g.gpu_type} candidates in {zones} "
                        f"will be refused (one VM takes {g.per_vm})",
                        quota_fix(plan.project, metric, plan.parallelism * g.per_vm, region),
                    )
                )
    if vms == 0:
        first = plan.gpus[0]
        metric = ("PREEMPTIBLE_" if plan.spot else "") + _metric(first.gpu_type)
        out.append(
            Finding(
                FAIL,
                "quota",
                f"no region the placements use has {first.gpu_type} quota for one VM "
                f"({', '.join(first.regions)})",
                quota_fix(plan.project, metric, plan.parallelism * first.per_vm, first.regions[0]),
            )
        )
        return out
    out.extend(regional)
    if vms < plan.parallelism:
        out.append(
            Finding(
                FAIL,
                "quota",
                f"regional GPU quota fits {vms} VM(s) at once, the experiment runs "
                f"{plan.parallelism} ({'; '.join(usable)}); or set sweep.max_gpu_in_flight: {vms}",
                "request more in one of those regions: "
                + quota_fix(
                    plan.project,
                    ("PREEMPTIBLE_" if plan.spot else "") + _metric(plan.gpus[0].gpu_type),
                    plan.parallelism * plan.gpus[0].per_vm,
                    plan.gpus[0].regions[0],
                ),
            )
        )
    else:
        out.append(
            Finding(OK, "quota", f"regional GPU quota fits {vms} VM(s): {'; '.join(usable)}")
        )
    return out


def _metric(gpu_type: str) -> str:
    return GPU_METRICS.get(gpu_type) or (
        "NVIDIA_"
        + gpu_type.removeprefix("nvidia-").removeprefix("tesla-").upper().replace("-", "_")
        + "_GPUS"
    )


def _regional_limit(quotas: dict[str, Any], gpu_type: str, spot: bool) -> tuple[str, int]:
    """(metric, limit) a VM of `gpu_type` draws on: spot VMs use the preemptible quota
    where the project has some, else the standard quota (as GCE counts them)."""
    std = _metric(gpu_type)
    std_limit = int(quotas[std].limit) if std in quotas else 0
    if spot:
        pre = f"PREEMPTIBLE_{std}"
        pre_limit = int(quotas[pre].limit) if pre in quotas else 0
        if pre_limit > 0 or std_limit == 0:
            return pre, pre_limit
    return std, std_limit


def _compute_error(ctx: Context, e: Any, what: str) -> Finding:
    if e.code in ("accessNotConfigured", "SERVICE_DISABLED") or "has not been used" in str(e):
        if "compute.googleapis.com" in ctx.disabled:
            return Finding(WARN, "quota", "not checked: the Compute Engine API is not enabled")
        return disabled_finding(ctx, "compute.googleapis.com", what)
    if e.code in ("forbidden", "PERMISSION_DENIED", "403"):
        return Finding(
            FAIL,
            "quota",
            f"{what} refused: you may not read {ctx.plan.project}'s Compute Engine settings ({e})",
            f"ask for roles/compute.viewer (or roles/compute.instanceAdmin.v1) on {ctx.plan.project}",
        )
    return Finding(FAIL, "quota", f"{what} failed: {e}")


# -- running them -----------------------------------------------------------------------


def run_doctor(
    plan: DoctorPlan, *, compute_factory: Callable[[str], Any] | None = None
) -> list[Finding]:
    """Every check in order; a check that cannot run (no credentials, a disabled API)
    says so in one line instead of failing after it."""

    out: list[Finding] = []
    if plan.placeholders:
        names = ", ".join(plan.placeholders)
        out.append(
            Finding(
                FAIL,
                "experiment",
                f"placeholders stand in for {names}: the project and bucket checks need the "
                "real values",
                "export " + " ".join(f"{n}=..." for n in plan.placeholders),
            )
        )
    ctx = Context(plan)
    out += check_credentials(ctx)
    if ctx.credentials is None or plan.placeholders:
        out.append(
            Finding(
                WARN,
                "skipped",
                "APIs, quota, bucket and service account (they need "
                + ("credentials" if ctx.credentials is None else "the real project and bucket")
                + ")",
            )
        )
        return out
    if compute_factory is None:
        from resources.compute.gce.api import ComputeApi

        compute_factory = ComputeApi
    ctx.compute = compute_factory(plan.project)
    creds = ctx.credentials
    user = type(creds).__module__.startswith("google.oauth2.credentials")
    if user and not getattr(creds, "quota_project_id", None):
        # user credentials need a quota project for Service Usage / Resource Manager calls
        creds = creds.with_quota_project(plan.project)
    ctx.admin = AdminApi(plan.project, credentials=creds)
    out += check_apis(ctx)
    if "compute.googleapis.com" in ctx.disabled:
        out.append(Finding(WARN, "quota", "not checked: the Compute Engine API is not enabled"))
    else:
        out += check_quota(ctx)
    out += check_access(ctx)
    return out


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.level == FAIL for f in findings) else 0


def summary(findings: list[Finding]) -> str:
    fails = sum(f.level == FAIL for f in findings)
    warns = sum(f.level == WARN for f in findings)
    if fails:
        return (
            f"lab doctor: {fails} problem(s) to fix (each FAIL line says how), {warns} warning(s)"
        )
    return f"lab doctor: ready ({warns} warning(s))"
