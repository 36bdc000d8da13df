"""`lab doctor` against fakes of every service it asks: Compute Engine (projects.get,
regions.get), Service Usage, Resource Manager, IAM, the OAuth token endpoint (a real
google-auth refresh of a service-account key) and GCS (the emulator, a fault proxy in
front of it for a refused write).

A healthy project passes with only `ok` lines; each broken thing (no credentials, an API
disabled, no GPU quota, a missing or unwritable bucket, a VM service account without
storage rights or that the caller may not use) is exactly one FAIL line that names the
command fixing it, exit 1, and no traceback.
"""

from __future__ import annotations

import json
import os

import pytest

from lab_assets.cli.main import main
from lab_assets_tests.conftest import TESTS_DIR
from lab_assets_tests.fakes.fake_compute_project import default_service_account
from lab_assets_tests.fakes.fake_gcp_admin import FakeGcpAdmin, bucket_defaults
from lab_assets_tests.fakes.gcs_emulator import EMULATOR_ENV, FaultProxy
from lab_assets_tests.gce_fixtures import BUCKET
from lab_assets_tests.resources.compute.gce.test_gce_body import GCE_EXPERIMENT
from resources.compute.gce.gcp_admin import ADMIN_ENDPOINT_ENV

pytest_plugins = ["lab_assets_tests.gce_fixtures"]

PROJECT = "lab-test-project"
VM_SA = f"lab-vm@{PROJECT}.iam.gserviceaccount.com"
CALLER = f"doctor-test@{PROJECT}.iam.gserviceaccount.com"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    """A service-account key (a fresh RSA key) whose token_uri is filled in per test."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return tmp_path_factory.mktemp("doctor-key") / "key.json", pem


@pytest.fixture(scope="module")
def admin(fake_gce):
    with FakeGcpAdmin(fake_gce, PROJECT) as fake:
        yield fake


@pytest.fixture
def project(gce, admin, key_file, monkeypatch):
    """A healthy project: credentials, APIs, quota, the bucket, the VMs' account and rights."""
    path, pem = key_file
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": "doctor-key",
                "private_key": pem,
                "client_email": CALLER,
                "client_id": "1",
                "token_uri": admin.token_uri,
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    monkeypatch.setenv(ADMIN_ENDPOINT_ENV, admin.url)
    monkeypatch.delenv("LAB_STORAGE_ROOT", raising=False)
    gce.reset_project()
    admin.service_accounts = {default_service_account(), VM_SA}
    admin.caller_may_act_as = True
    admin.project_bindings = [
        {"role": "roles/compute.instanceAdmin.v1", "members": [f"serviceAccount:{VM_SA}"]},
        {"role": "roles/logging.logWriter", "members": [f"serviceAccount:{VM_SA}"]},
        {"role": "roles/owner", "members": [f"serviceAccount:{CALLER}"]},
    ]
    admin.bucket_bindings = {
        BUCKET: [
            *bucket_defaults(PROJECT),
            {"role": "roles/storage.objectAdmin", "members": [f"serviceAccount:{VM_SA}"]},
        ]
    }
    yield admin
    gce.reset_project()


def experiment(tmp_path, storage: str = f"gs://{BUCKET}/experiments", sa: str | None = VM_SA):
    """The GCE test experiment, 2 VMs at once, with its VMs' service account and storage."""
    text = GCE_EXPERIMENT.read_text().replace(
        f"storage: gs://{BUCKET}/experiments", f"storage: {storage}"
    )
    if sa:
        text = text.replace("  spot: true\n", f"  spot: true\n  service_account: {sa}\n")
    path = tmp_path / "exp.yaml"
    path.write_text(text + "sweep: {max_gpu_in_flight: 2}\n")
    return str(path)


def doctor(capsys, exp: str) -> tuple[int, list[str]]:
    rc = main(["doctor", "--experiment", exp])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err, captured.err[-3000:]
    return rc, captured.out.splitlines()


def fails(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith("FAIL")]


def test_a_healthy_project_passes(project, gce, tmp_path, capsys):
    from resources.remote.protocol import make_storage_client

    rc, lines = doctor(capsys, experiment(tmp_path))
    text = "\n".join(lines)
    assert rc == 0, text
    assert not fails(lines) and not [ln for ln in lines if ln.startswith("warn")], text
    assert f"ok    credentials: service account {CALLER}, token refreshed" in text
    assert "ok    apis: Compute Engine API enabled" in text
    assert "ok    apis: Cloud Storage API enabled" in text
    assert "ok    quota: GPUS_ALL_REGIONS 8 >= 2 needed" in text
    assert "ok    quota: regional GPU quota fits 8 VM(s): nvidia-l4 in us-central1" in text
    assert f"ok    bucket: gs://{BUCKET}/experiments/small-gce: exists; a probe was written" in text
    assert f"{VM_SA} exists and you may run VMs as it" in text
    assert f"{VM_SA} may use gs://{BUCKET}: roles/storage.objectAdmin on gs://{BUCKET}" in text
    assert "read from IAM policies, not tried as the account" in text
    assert f"{VM_SA} may delete its own VM (roles/compute.instanceAdmin.v1)" in text
    assert lines[-1] == "lab doctor: ready (0 warning(s))"
    # the probe is gone; the token came from a real google-auth refresh against the fake
    left = make_storage_client().list_blobs(BUCKET, prefix="experiments/small-gce/.lab-doctor")
    assert not list(left)
    assert ("POST", "/token") in project.calls
    assert ("GET", f"/compute/v1/projects/{PROJECT}/regions/us-central1") in gce.calls


def test_no_credentials_is_one_line_and_nothing_is_called(
    project, gce, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    calls, admin_calls = len(gce.calls), len(project.calls)
    rc, lines = doctor(capsys, experiment(tmp_path))
    assert rc == 1
    (line,) = fails(lines)
    assert line.startswith("FAIL  credentials: no Application Default Credentials (File ")
    assert "-> gcloud auth application-default login" in line
    assert any(ln.startswith("warn  skipped: APIs, quota, bucket") for ln in lines)
    assert len(gce.calls) == calls and len(project.calls) == admin_calls


@pytest.mark.parametrize("service_usage", ["enabled", "disabled"])
def test_a_disabled_compute_api_is_one_line_naming_the_enable_command(
    project, gce, tmp_path, capsys, service_usage
):
    gce.disabled_services.add("compute.googleapis.com")
    if service_usage == "disabled":  # then read from Compute's own 403 accessNotConfigured
        gce.disabled_services.add("serviceusage.googleapis.com")
    rc, lines = doctor(capsys, experiment(tmp_path))
    assert rc == 1
    (line,) = fails(lines)
    assert line.startswith(f"FAIL  apis: Compute Engine API is not enabled in {PROJECT}")
    assert line.endswith(f"-> gcloud services enable compute.googleapis.com --project {PROJECT}")
    if service_usage == "disabled":
        assert "(projects.get answered SERVICE_DISABLED)" in line
        assert any(
            "could not read which APIs are enabled (403 SERVICE_DISABLED)" in ln for ln in lines
        )


def test_zero_gpus_all_regions_is_one_line_naming_the_quota_request(project, gce, tmp_path, capsys):
    gce.project_quotas["GPUS_ALL_REGIONS"] = 0.0  # as in every new project
    rc, lines = doctor(capsys, experiment(tmp_path))
    assert rc == 1
    (line,) = fails(lines)
    assert "GPUS_ALL_REGIONS is 0 in lab-test-project: no GPU VM can start" in line
    assert (
        "-> gcloud quotas preferences create --service=compute.googleapis.com "
        "--quota-id=GPUS-ALL-REGIONS-per-project --preferred-value=2 --project=lab-test-project"
    ) in line


def test_regional_quota_spot_uses_preemptible_else_standard(project, gce, tmp_path, capsys):
    exp = experiment(tmp_path)
    # no preemptible L4 quota, but standard quota: spot VMs draw on the standard quota
    gce.region_quotas["us-central1"] = {"PREEMPTIBLE_NVIDIA_L4_GPUS": 0.0, "NVIDIA_L4_GPUS": 1.0}
    rc, lines = doctor(capsys, exp)
    (line,) = fails(lines)
    assert "regional GPU quota fits 1 VM(s) at once, the experiment runs 2" in line
    assert "nvidia-l4 in us-central1 (NVIDIA_L4_GPUS 1)" in line
    # neither: not one VM fits in the only region the placements use
    gce.region_quotas["us-central1"]["NVIDIA_L4_GPUS"] = 0.0
    rc, lines = doctor(capsys, exp)
    assert rc == 1
    (line,) = fails(lines)
    assert "no region the placements use has nvidia-l4 quota for one VM (us-central1)" in line
    assert "--quota-id=PREEMPTIBLE-NVIDIA-L4-GPUS-per-project-region --preferred-value=2" in line
    assert "--dimensions=region=us-central1" in line


def test_a_missing_bucket_is_one_line_naming_the_create_command(project, tmp_path, capsys):
    rc, lines = doctor(capsys, experiment(tmp_path, storage="gs://lab-no-such-bucket/x"))
    assert rc == 1
    (line,) = fails(lines)
    assert line == (
        "FAIL  bucket: gs://lab-no-such-bucket does not exist -> gcloud storage buckets create "
        "gs://lab-no-such-bucket --project lab-test-project --location us-central1 "
        "--uniform-bucket-level-access"
    )


def test_an_unwritable_bucket_is_one_line_naming_the_grant(
    project, gcs_emulator, tmp_path, capsys, monkeypatch
):
    with FaultProxy(os.environ[EMULATOR_ENV]) as proxy:
        proxy.add(403, match=lambda r: r.method == "POST" and r.path.startswith("/upload/"))
        monkeypatch.setenv(EMULATOR_ENV, proxy.url)
        rc, lines = doctor(capsys, experiment(tmp_path))
    assert rc == 1
    (line,) = fails(lines)
    assert line.startswith(f"FAIL  bucket: gs://{BUCKET}: writing a probe object refused (403")
    assert line.endswith(
        f"-> gcloud storage buckets add-iam-policy-binding gs://{BUCKET} "
        f"--member=serviceAccount:{CALLER} --role=roles/storage.objectAdmin"
    )


def test_a_vm_service_account_without_storage_rights_is_one_line(project, tmp_path, capsys):
    project.bucket_bindings[BUCKET] = bucket_defaults(PROJECT)  # nothing for lab-vm
    rc, lines = doctor(capsys, experiment(tmp_path))
    assert rc == 1
    (line,) = fails(lines)
    assert f"the VMs' service account {VM_SA} lacks storage.objects.create" in line
    assert "read from IAM policies, not tried as the account" in line
    assert line.endswith(
        f"-> gcloud storage buckets add-iam-policy-binding gs://{BUCKET} "
        f"--member=serviceAccount:{VM_SA} --role=roles/storage.objectAdmin"
    )


def test_the_default_compute_account_with_editor_passes_through_the_legacy_bucket_roles(
    project, tmp_path, capsys
):
    sa = default_service_account()
    project.project_bindings = [{"role": "roles/editor", "members": [f"serviceAccount:{sa}"]}]
    rc, lines = doctor(capsys, experiment(tmp_path, sa=None))
    text = "\n".join(lines)
    assert rc == 0, text
    assert f"{sa} may use gs://{BUCKET}: roles/editor on project {PROJECT}" in text
    assert f"{sa} may delete its own VM (roles/editor)" in text


def test_a_service_account_the_caller_may_not_use_or_that_is_missing(project, tmp_path, capsys):
    project.caller_may_act_as = False
    rc, lines = doctor(capsys, experiment(tmp_path))
    (line,) = fails(lines)
    assert f"you may not run VMs as {VM_SA}" in line
    assert f"--member=serviceAccount:{CALLER} --role=roles/iam.serviceAccountUser" in line
    project.service_accounts.discard(VM_SA)
    rc, lines = doctor(capsys, experiment(tmp_path))
    (line,) = fails(lines)
    assert line.endswith(f"-> gcloud iam service-accounts create lab-vm --project {PROJECT}")


def test_the_shipped_3b_experiment_without_variables_or_credentials(tmp_path, capsys, monkeypatch):
    for name in ("LAB_GCP_PROJECT", "LAB_GCS_BUCKET", "LAB_STORAGE_ROOT", ADMIN_ENDPOINT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "none.json"))
    rc, lines = doctor(capsys, str(TESTS_DIR.parent / "experiments" / "qwen2.5-3b-lora.yaml"))
    assert rc == 1
    assert [ln.split(":")[0] for ln in fails(lines)] == ["FAIL  experiment", "FAIL  credentials"]
    assert "-> export LAB_GCS_BUCKET=... LAB_GCP_PROJECT=..." in fails(lines)[0]


def test_what_can_only_be_checked_indirectly_says_so(project, gce, tmp_path, capsys):
    # IAM API off: the account's existence and actAs go unchecked, the policies still read
    gce.disabled_services.add("iam.googleapis.com")
    rc, lines = doctor(capsys, experiment(tmp_path))
    text = "\n".join(lines)
    assert rc == 0, text
    assert "warn  apis: IAM API is not enabled in lab-test-project" in text
    assert "-> gcloud services enable iam.googleapis.com --project lab-test-project" in text
    assert f"{VM_SA} may use gs://{BUCKET}: roles/storage.objectAdmin" in text
    # the bucket's policy unreadable and nothing in the project's: open, not failed
    gce.disabled_services.clear()
    del project.bucket_bindings[BUCKET]
    rc, lines = doctor(capsys, experiment(tmp_path))
    (line,) = [ln for ln in lines if "indirectly" in ln]
    assert rc == 0 and line.startswith(f"warn  service account: the VMs' service account {VM_SA}")
    assert f"unreadable: gs://{BUCKET} (404 NOT_FOUND)" in line
    assert line.endswith(f"--member=serviceAccount:{VM_SA} --role=roles/storage.objectAdmin")
