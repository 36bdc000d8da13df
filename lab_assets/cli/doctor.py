"""`lab doctor [--experiment PATH]`: check a project is ready before the first launch.

For a ``compute.kind: gce`` experiment: credentials, the Compute Engine and Cloud
Storage APIs, GPU quota against what the experiment runs at once, the bucket
(written, read back, deleted) and the VMs' service account
(``resources/compute/gce/doctor.py``, ``doctor_access.py``). One line per finding,
``ok`` / ``warn`` / ``FAIL``, each FAIL with the command that fixes it; exit 1 if any
FAIL. For a local experiment, only its storage root is probed.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lab_assets.cli.common import add_command, add_experiment

if TYPE_CHECKING:
    from lab_assets.experiment.resolved import Experiment
    from resources.compute.gce.doctor_findings import DoctorPlan, Finding


def doctor_plan(exp: Experiment) -> tuple[DoctorPlan, list[Finding]]:
    """What the experiment needs from its project, and findings about the file itself."""
    from lab_assets.defs.resources import gce_compute, gce_settings
    from resources.compute.gce.doctor import gpu_needs
    from resources.compute.gce.doctor_findings import FAIL, DoctorPlan, Finding

    compute = gce_compute(exp)
    s = gce_settings(exp)
    notes: list[Finding] = []
    roots = [exp.storage_root, s.staging_root or ""]
    if not exp.storage_root.startswith("gs://") and compute.require_gcs_storage:
        notes.append(
            Finding(
                FAIL,
                "experiment",
                f"storage root {exp.storage_root} is not gs://bucket/prefix: the VMs cannot reach it",
                "set the experiment's `storage` or LAB_STORAGE_ROOT to gs://BUCKET/PREFIX",
            )
        )
    plan = DoctorPlan(
        project=s.project,
        spot=s.spot,
        parallelism=exp.file.sweep.max_gpu_in_flight,
        gpus=gpu_needs(s.placements()),
        buckets=tuple(r for r in roots if r.startswith("gs://")),
        experiment=exp.name,
        service_account=s.service_account,
        placeholders=tuple(exp.placeholders),
    )
    return plan, notes


def _local(exp: Experiment) -> int:
    from resources.storage.base import StorageError
    from resources.storage.preflight import check_writable

    print(f"ok    compute: {exp.file.compute.kind} (nothing on Google Cloud to check)")
    try:
        check_writable(exp.storage_root, exp.name)
    except StorageError as e:
        print(f"FAIL  storage: {e}")
        return 1
    print(f"ok    storage: {exp.storage_root} is writable")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from lab_assets.experiment.load import load_experiment
    from resources.compute.gce.doctor import exit_code, run_doctor, summary

    exp = load_experiment(args.experiment)
    if exp.file.compute.kind != "gce":
        return _local(exp)
    plan, findings = doctor_plan(exp)
    print(f"lab doctor: {exp.name} on GCE, project {plan.project}")
    findings += run_doctor(plan)
    for f in findings:
        print(f.line())
    print(summary(findings))
    return exit_code(findings)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "doctor",
        purpose="Check a GCP project is ready for the experiment: one line per problem, with its fix.",
        help="check a GCP project is ready for the experiment (credentials, APIs, quota, bucket)",
        examples=["lab doctor --experiment experiments/qwen2.5-3b-lora.yaml"],
        fn=_cmd_doctor,
    )
    add_experiment(p)
