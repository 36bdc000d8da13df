"""`lab doctor`'s storage and identity checks: the bucket, and the VMs' service account.

- Each bucket the experiment writes (its storage root and the launcher's staging
  root) exists, and the caller can write, read back and delete a probe object in
  the experiment's folder of it.
- The VMs' service account (the experiment's ``compute.service_account``, else the
  project's default compute service account) exists and the caller may run VMs as
  it (IAM ``testIamPermissions`` for ``iam.serviceAccounts.actAs``, as the caller).
- Whether that account may use the bucket cannot be tried without impersonating it,
  so it is read from IAM policies, and the output says so: the bucket's policy and
  the project's, the roles bound to ``serviceAccount:EMAIL`` (and the bucket's
  ``projectEditor:``/``projectOwner:`` convenience members where the account holds
  Editor/Owner), mapped to the object permissions the agent uses (create, get,
  list, delete). Grants through groups, folders or the organization are not seen,
  and a custom role is not expanded: the line says when that leaves the answer open.
- The VM deletes itself when idle (``compute.instances.delete`` on itself); without
  a role granting it, idle VMs live until the launcher or ``maxRunDuration`` ends
  them: a warning, not a failure.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from resources.compute.gce.doctor_findings import (
    FAIL,
    OK,
    WARN,
    Finding,
    disabled_finding,
    enable_fix,
)
from resources.compute.gce.gcp_admin import AdminError

if TYPE_CHECKING:
    from resources.compute.gce.doctor_findings import Context

CREATE, GET, LIST, DELETE = (f"storage.objects.{v}" for v in ("create", "get", "list", "delete"))
NEEDED = frozenset({CREATE, GET, LIST, DELETE})
_ALL = NEEDED
# The object permissions of the predefined and basic roles (GCS IAM roles reference).
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "roles/owner": _ALL,
    "roles/editor": _ALL,
    "roles/storage.admin": _ALL,
    "roles/storage.objectAdmin": _ALL,
    "roles/storage.objectUser": _ALL,
    "roles/storage.objectCreator": frozenset({CREATE}),
    "roles/storage.objectViewer": frozenset({GET, LIST}),
    "roles/storage.legacyBucketOwner": frozenset({CREATE, DELETE, LIST}),
    "roles/storage.legacyBucketWriter": frozenset({CREATE, DELETE, LIST}),
    "roles/storage.legacyBucketReader": frozenset({LIST}),
    "roles/storage.legacyObjectOwner": frozenset({GET}),
    "roles/storage.legacyObjectReader": frozenset({GET}),
}
# Project roles that let an instance delete itself.
SELF_DELETE_ROLES = frozenset(
    {
        "roles/owner",
        "roles/editor",
        "roles/compute.admin",
        "roles/compute.instanceAdmin",
        "roles/compute.instanceAdmin.v1",
    }
)
BUCKET_ROLE = "roles/storage.objectAdmin"  # what README's setup grants the VMs' account


def _bucket_and_prefix(uri: str) -> tuple[str, str]:
    rest = uri.removeprefix("gs://").rstrip("/")
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix


def check_access(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    buckets: dict[str, str] = {}  # bucket -> first prefix seen
    for uri in ctx.plan.buckets:
        if uri.startswith("gs://"):
            b, prefix = _bucket_and_prefix(uri)
            buckets.setdefault(b, prefix)
    usable = []
    for bucket, prefix in buckets.items():
        found = check_bucket(ctx, bucket, prefix)
        out.append(found)
        if not found.text.endswith("does not exist"):  # no rights to check on a missing one
            usable.append(bucket)
    out += check_service_account(ctx, usable)
    return out


# -- the bucket, as the caller ----------------------------------------------------------


def check_bucket(ctx: Context, bucket: str, prefix: str) -> Finding:
    from google.api_core import exceptions as gexc

    from resources.remote.protocol import make_storage_client

    project = ctx.plan.project
    if "storage.googleapis.com" in ctx.disabled:
        return Finding(WARN, "bucket", f"gs://{bucket} not checked: Cloud Storage API not enabled")
    where = "/".join(p for p in (prefix, ctx.plan.experiment) if p)
    name = (
        f"{where}/.lab-doctor-{uuid.uuid4().hex[:12]}"
        if where
        else f".lab-doctor-{uuid.uuid4().hex[:12]}"
    )
    data = b"lab doctor probe\n"
    step, note = "reading the bucket", ""
    blob = written = None
    try:
        b = make_storage_client(project).bucket(bucket)
        try:
            b.reload()
        except gexc.Forbidden:  # storage.buckets.get is not needed to use it: try the objects
            note = " (its metadata is not readable to you: storage.buckets.get)"
        blob = b.blob(name)
        step = "writing a probe object"
        blob.upload_from_string(data, if_generation_match=0)
        written = blob.generation
        step = "reading the probe back"
        back = blob.download_as_bytes()
        step = "deleting the probe"
        blob.delete(if_generation_match=written)
        written = None
    except gexc.NotFound:
        if step in ("reading the bucket", "writing a probe object"):
            return Finding(
                FAIL,
                "bucket",
                f"gs://{bucket} does not exist",
                f"gcloud storage buckets create gs://{bucket} --project {project} "
                f"--location {_first_region(ctx)} --uniform-bucket-level-access",
            )
        return Finding(FAIL, "bucket", f"gs://{bucket}: {step} answered 404 (object vanished?)")
    except gexc.GoogleAPICallError as e:
        message = str(getattr(e, "message", "") or e)
        if "has not been used in project" in message or "SERVICE_DISABLED" in message:
            return disabled_finding(ctx, "storage.googleapis.com", f"gs://{bucket}")
        if e.code in (401, 403):
            return Finding(
                FAIL,
                "bucket",
                f"gs://{bucket}: {step} refused ({e.code}: {message[:160]})",
                f"gcloud storage buckets add-iam-policy-binding gs://{bucket} "
                f"--member={_caller_member(ctx)} --role={BUCKET_ROLE}",
            )
        return Finding(FAIL, "bucket", f"gs://{bucket}: {step} failed ({e.code}: {message[:200]})")
    except Exception as e:  # transport errors: requests / google.auth
        from google.auth.exceptions import GoogleAuthError
        from requests import RequestException

        if not isinstance(e, RequestException | GoogleAuthError):
            raise
        return Finding(FAIL, "bucket", f"gs://{bucket}: {step} failed ({type(e).__name__}: {e})")
    finally:
        if blob is not None and written is not None:  # a probe left behind by a failure
            try:
                blob.delete(if_generation_match=written)
            except Exception:
                pass
    if back != data:
        return Finding(
            FAIL, "bucket", f"gs://{bucket}: the probe read back differs from what was written"
        )
    return Finding(
        OK,
        "bucket",
        f"gs://{bucket}/{where}: exists; a probe was written, read back and deleted{note}",
    )


def _first_region(ctx: Context) -> str:
    for g in ctx.plan.gpus:
        if g.regions:
            return g.regions[0]
    return "us-central1"


def _caller_member(ctx: Context) -> str:
    email = getattr(ctx.credentials, "service_account_email", None)
    if email and email != "default":
        return f"serviceAccount:{email}"
    return "user:YOUR_EMAIL"


# -- the VMs' service account -----------------------------------------------------------


def _default_sa(ctx: Context) -> str | None:
    if ctx.project_info is None and "compute.googleapis.com" not in ctx.disabled:
        from resources.compute.gce.errors import GceApiError

        try:
            ctx.project_info = ctx.compute.get_project()
        except GceApiError:
            return None
    return getattr(ctx.project_info, "default_service_account", None) or None


def check_service_account(ctx: Context, buckets: list[str]) -> list[Finding]:
    project = ctx.plan.project
    sa = ctx.plan.service_account
    label = "the VMs' service account"
    if not sa:
        sa = _default_sa(ctx)
        label = "the VMs' service account (the default compute one)"
        if not sa:
            return [
                Finding(
                    WARN,
                    "service account",
                    "not checked: no compute.service_account set and the project's default "
                    "compute service account could not be read",
                )
            ]
    out: list[Finding] = []
    if "iam.googleapis.com" not in ctx.disabled:
        out += _exists_and_act_as(ctx, sa, label)
        if out and out[0].level == FAIL and "does not exist" in out[0].text:
            return out
    policies: list[tuple[str, dict]] = []
    unread: list[str] = []
    try:
        policies.append((f"project {project}", ctx.admin.project_policy()))
    except AdminError as e:
        unread.append(f"project {project} ({e.status} {e.reason})")
    project_roles = _roles_of(policies[0][1], {f"serviceAccount:{sa}"}) if policies else set()
    members = {f"serviceAccount:{sa}"} | _convenience_members(ctx, project_roles)
    for bucket in buckets:
        bucket_policies = list(policies)
        bucket_unread = list(unread)
        try:
            bucket_policies.append((f"gs://{bucket}", ctx.admin.bucket_policy(bucket)))
        except AdminError as e:
            bucket_unread.append(f"gs://{bucket} ({e.status} {e.reason})")
        out.append(_storage_finding(sa, label, bucket, bucket_policies, bucket_unread, members))
    if ctx.plan.vm_self_delete and policies:
        if project_roles & SELF_DELETE_ROLES:
            held = ", ".join(sorted(project_roles & SELF_DELETE_ROLES))
            out.append(Finding(OK, "service account", f"{sa} may delete its own VM ({held})"))
        else:
            out.append(
                Finding(
                    WARN,
                    "service account",
                    f"{sa} holds no project role with compute.instances.delete: an idle VM "
                    "cannot delete itself and runs (and costs) until the launcher or "
                    "maxRunDuration ends it (from the project's IAM policy)",
                    f"gcloud projects add-iam-policy-binding {project} "
                    f"--member=serviceAccount:{sa} --role=roles/compute.instanceAdmin.v1",
                )
            )
    return out


def _exists_and_act_as(ctx: Context, sa: str, label: str) -> list[Finding]:
    project = ctx.plan.project
    try:
        account = ctx.admin.service_account(sa)
    except AdminError as e:
        if e.service_disabled:
            return [
                Finding(
                    WARN,
                    "service account",
                    f"{sa}: not checked, the IAM API is not enabled",
                    enable_fix(project, "iam.googleapis.com"),
                )
            ]
        return [
            Finding(WARN, "service account", f"{sa}: could not be read ({e.status} {e.reason})")
        ]
    if account is None:
        short = sa.split("@", 1)[0]
        fix = (
            f"gcloud iam service-accounts create {short} --project {project}"
            if sa.endswith(f"@{project}.iam.gserviceaccount.com")
            else "set compute.service_account to an account that exists"
        )
        return [Finding(FAIL, "service account", f"{label} {sa} does not exist", fix)]
    try:
        held = ctx.admin.caller_may(sa, ["iam.serviceAccounts.actAs"])
    except AdminError as e:
        return [
            Finding(WARN, "service account", f"{sa}: actAs not checked ({e.status} {e.reason})")
        ]
    if "iam.serviceAccounts.actAs" not in held:
        return [
            Finding(
                FAIL,
                "service account",
                f"you may not run VMs as {sa} (no iam.serviceAccounts.actAs on it)",
                f"gcloud iam service-accounts add-iam-policy-binding {sa} "
                f"--member={_caller_member(ctx)} --role=roles/iam.serviceAccountUser "
                f"--project {project}",
            )
        ]
    return [Finding(OK, "service account", f"{sa} exists and you may run VMs as it")]


def _roles_of(policy: dict, members: set[str]) -> set[str]:
    return {
        str(b.get("role"))
        for b in policy.get("bindings") or []
        if members & set(b.get("members") or [])
    }


def _convenience_members(ctx: Context, project_roles: set[str]) -> set[str]:
    """The bucket's legacy ``projectOwner:P`` / ``projectEditor:P`` members the account is in."""
    ids = {ctx.plan.project}
    if ctx.project_info is not None and getattr(ctx.project_info, "id", None):
        ids.add(str(ctx.project_info.id))
    out = set()
    for role, kind in (("roles/owner", "projectOwner"), ("roles/editor", "projectEditor")):
        if role in project_roles:
            out |= {f"{kind}:{i}" for i in ids}
    return out


def _storage_finding(
    sa: str,
    label: str,
    bucket: str,
    policies: list[tuple[str, dict]],
    unread: list[str],
    members: set[str],
) -> Finding:
    fix = (
        f"gcloud storage buckets add-iam-policy-binding gs://{bucket} "
        f"--member=serviceAccount:{sa} --role={BUCKET_ROLE}"
    )
    held: dict[str, str] = {}  # role -> where
    custom, conditional, opaque = [], [], set()
    for where, policy in policies:
        for b in policy.get("bindings") or []:
            bound = set(b.get("members") or [])
            opaque |= {
                m for m in bound if m.split(":", 1)[0] in ("group", "domain", "principalSet")
            }
            if not members & bound:
                continue
            role = str(b.get("role"))
            if b.get("condition"):
                conditional.append(f"{role} ({where})")
            if role in ROLE_PERMISSIONS:
                held.setdefault(role, where)
            elif not role.startswith("roles/"):
                custom.append(f"{role} ({where})")
    perms = set().union(*(ROLE_PERMISSIONS[r] for r in held)) if held else set()
    missing = sorted(NEEDED - perms)
    how = "read from IAM policies, not tried as the account"
    if not missing:
        roles = ", ".join(f"{r} on {w}" for r, w in held.items())
        note = f"; conditional: {', '.join(conditional)}" if conditional else ""
        return Finding(OK, "service account", f"{sa} may use gs://{bucket}: {roles} ({how}{note})")
    open_ends = []
    if unread:
        open_ends.append(f"unreadable: {', '.join(unread)}")
    if custom:
        open_ends.append(f"custom roles not expanded: {', '.join(custom)}")
    if opaque:
        open_ends.append(f"group/domain members not expanded: {', '.join(sorted(opaque)[:3])}")
    if not policies or open_ends:
        return Finding(
            WARN,
            "service account",
            f"{label} {sa}: could only be checked indirectly for gs://{bucket}, missing "
            f"{', '.join(missing)} in what was read ({'; '.join(open_ends)})",
            fix,
        )
    return Finding(
        FAIL,
        "service account",
        f"{label} {sa} lacks {', '.join(missing)} on gs://{bucket}: its first status write "
        f"would be refused ({how}; folder/organization grants are not seen)",
        fix,
    )
