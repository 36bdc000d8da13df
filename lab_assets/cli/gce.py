"""`lab launch`, `lab vms`, `lab image`: the GCE side of the `lab` console script.

- `lab launch --asset adapter --partition KEY [--zone Z] [--machine-type M] [--gpu-type G]
  [--keep-vm] [--dry-run [--body-out FILE]]`: materialise one partition on a GCE VM
  through Dagster; with `--dry-run`, print the zones / machine types it would try with
  their GPUs, $/h and worst case against the budget (cli/gce_dry_run.py), and with
  `--body-out` write the exact `instances.insert` body (JSON, camelCase) to FILE,
  touching neither Compute Engine nor GCS and needing no credentials.
- `lab vms list` / `lab vms reap [--dry-run] [--max-age-h H]`: the experiment's lab
  VMs, and deleting those whose agent's heartbeat is stale, idle ones past their idle
  time, kept ones past their time, and those past their deadline or the age limit
  (never one whose agent is alive and working, whatever its Dagster run says).
- `lab image build [--no-require-cuda] [--health-model REPO[@REV]]`,
  `lab image teardown [--archive gs://...]`, `lab image import gs://.../X.tar.gz`:
  the pre-baked image (see resources/compute/gce/images.py).

Every command takes `--experiment FILE` (default `$LAB_EXPERIMENT`); the experiment's
compute must be `gce`. Without Google credentials a command that needs them prints one
line saying how to get them (no traceback).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from lab_assets.cli.common import add_command, add_experiment, build_tree, check_storage, run
from lab_assets.cli.gce_dry_run import DRY_RUN_ID, dry_run_body, dry_run_table
from lab_assets.defs.resources import gce_compute, gce_settings
from lab_assets.experiment.load import load_experiment
from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.schema import ExperimentError, HubSource
from resources.storage.base import partition_from_dirname

# Assets whose step runs through the step launcher (the rest run in the plan process).
LAUNCHED_ASSETS = {"adapter": "adapters_job"}
__all__ = ["DRY_RUN_ID", "dry_run_body", "gce_main", "image_manager", "register"]
NO_CREDENTIALS = (
    "lab: no Google Cloud credentials ({why}). Run `gcloud auth application-default login` "
    "(or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file kept outside the "
    "repository); `lab validate` and `lab launch --dry-run` need none; `lab doctor` checks "
    "credentials, APIs, quota, the bucket and the VMs' service account in one go."
)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "zone", None):
        out["zone"] = args.zone
    if getattr(args, "machine_type", None):
        out["machine_type_override"] = args.machine_type
    if getattr(args, "gpu_type", None):
        out["gpu_type_override"] = args.gpu_type
    if getattr(args, "keep_vm", False):
        out["keep_vm"] = True
    return out


def _check_target(exp: Experiment, asset: str, partition: str) -> None:
    if asset not in LAUNCHED_ASSETS:
        raise ExperimentError(
            f"{asset!r} does not run through the step launcher; GCE runs: "
            f"{', '.join(LAUNCHED_ASSETS)}"
        )
    from lab_assets.experiment.keys import split_adapter_key

    try:
        model_id, run_id = split_adapter_key(partition)
        exp.model(model_id)
        exp.run(run_id)
    except (KeyError, ValueError) as e:
        raise ExperimentError(f"{partition!r} is not a partition of {asset}: {e}") from None


def _require_credentials() -> None:
    """Application Default Credentials, or DefaultCredentialsError (one line at the CLI).
    Nothing to check when the Compute API is a local fake (the tests)."""
    from resources.compute.gce.api import ENDPOINT_ENV

    if os.environ.get(ENDPOINT_ENV, "").startswith("http://"):
        return
    import google.auth

    google.auth.default()


def _cmd_launch(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment)
    gce_compute(exp)
    _check_target(exp, args.asset, args.partition)
    if args.dry_run:
        print(dry_run_table(exp, args.asset, args.partition, **_overrides(args)))
        if args.body_out:
            import json

            body = dry_run_body(exp, args.asset, args.partition, **_overrides(args))
            with open(args.body_out, "w") as f:
                json.dump(body, f, indent=2)
            print(f"wrote the instances.insert body to {args.body_out}")
        return 0
    if args.body_out:
        raise ValueError("--body-out goes with --dry-run")
    exp.require_settings("lab launch")
    _require_credentials()
    check_storage(exp)
    from dagster import DagsterInstance

    from lab_assets.cli.progress import backfill_with_progress, settle_leftovers
    from lab_assets.orchestration.instance import ensure_dagster_home
    from resources.storage.open import open_store

    ensure_dagster_home()
    run_config: dict[str, Any] | None = None
    if overrides := _overrides(args):
        run_config = {"resources": {"step_launcher": {"config": overrides}}}
    title = f"lab launch: {args.asset}[{args.partition}]"
    with DagsterInstance.get() as instance:
        if not settle_leftovers(instance, open_store(exp.storage_root, exp.name)):
            return 130
        return backfill_with_progress(
            instance, exp, [(args.asset, args.partition)], title, run_config=run_config
        )


def _api(exp: Experiment):
    from resources.compute.gce.api import ComputeApi

    exp.require_settings("talking to Compute Engine")
    return ComputeApi(gce_compute(exp).project)


def _verdicts(exp: Experiment, max_age_s: float):
    from dagster import DagsterInstance

    from lab_assets.orchestration.instance import ensure_dagster_home
    from resources.compute.gce.gcs import Gcs
    from resources.compute.gce.reaper import dagster_run_status, judge_all

    ensure_dagster_home()
    api = _api(exp)
    with DagsterInstance.get() as instance:
        status = dagster_run_status(instance)  # shown; VMs are judged by their life signs
        return api, judge_all(api, Gcs(), gce_settings(exp), status, max_age_s)


def _cmd_vms(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment)
    c = gce_compute(exp)
    hours = getattr(args, "max_age_h", None)
    max_age = hours * 3600 if hours is not None else c.reap_after
    api, verdicts = _verdicts(exp, max_age)
    if args.vms_cmd == "list":
        now = time.time()
        print(f"{'name':40s} {'zone':16s} {'status':11s} {'age':>7s} {'run status':11s} verdict")
        for v in verdicts:
            print(
                f"{v.vm.name:40s} {v.vm.zone:16s} {v.vm.status:11s} "
                f"{v.vm.age_s(now) / 3600:6.2f}h {v.run_status or '?':11s} "
                f"{'REAP: ' if v.reap else 'keep: '}{v.reason}"
            )
        print(f"{len(verdicts)} lab VM(s) of {exp.name} in {c.project}")
        return 0
    from resources.compute.gce.reaper import reap

    done = reap(api, verdicts, dry_run=args.dry_run, log=print)
    print(f"{'would delete' if args.dry_run else 'deleted'} {len(done)} of {len(verdicts)} VM(s)")
    return 0


def image_manager(exp: Experiment, **changes: Any):
    from resources.compute.gce.gcs import Gcs
    from resources.compute.gce.images import ImageManager

    s = gce_settings(exp)
    return ImageManager(
        api=_api(exp),
        gcs=Gcs(),
        project=s.image_project or s.project,
        family=s.image_family,
        staging=s.staging,
        placements=s.placements(),
        base_image=f"projects/{s.fallback_image_project}/global/images/family/"
        f"{s.fallback_image_family}",
        boot_disk_gb=s.boot_disk_gb,
        service_account=s.service_account,
        network=s.network,
        subnetwork=s.subnetwork,
        external_ip=s.external_ip,
        **changes,
    )


def _health_model(exp: Experiment, arg: str | None) -> tuple[str | None, str | None]:
    if arg:
        repo, _, rev = arg.partition("@")
        return repo, rev or None
    for m in exp.file.base_models:
        if isinstance(m.source, HubSource):
            return m.source.repo_id, m.source.revision
    return None, None


def _cmd_image(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment)
    gce_compute(exp)
    mgr = image_manager(exp)
    if args.image_cmd == "build":
        model, rev = _health_model(exp, args.health_model)
        name = mgr.build(
            require_cuda=not args.no_require_cuda,
            health_model=model,
            health_revision=rev,
            import_modules=("lab_assets", "resources"),
        )
        print(f"built image {name} in family {mgr.family}")
    elif args.image_cmd == "teardown":
        uri = mgr.teardown(args.archive)
        print(f"archived to {uri}; restore with: lab image import {uri}")
    else:
        name = mgr.import_(args.archive, name=args.name)
        print(f"restored image {name} into family {mgr.family}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """`lab launch`, and the groups `lab vms list|reap` and `lab image build|teardown|import`."""
    p = add_command(
        subparsers,
        "launch",
        purpose="Materialise one partition on a GCE VM (--dry-run: the plan and its cost only).",
        help="materialise one partition on a GCE VM; --dry-run shows where and at what cost",
        examples=[
            "lab launch --experiment experiments/qwen2.5-3b-lora.yaml --asset adapter "
            "--partition 'qwen2.5-3b|sft-arith-r16-s0' --dry-run [--body-out body.json]",
        ],
        fn=_gce_errors(_cmd_launch),
    )
    add_experiment(p, "$LAB_EXPERIMENT")
    p.add_argument("--asset", required=True, help="asset to materialise, e.g. adapter")
    p.add_argument(
        "--partition",
        required=True,
        type=_partition_key,
        help="partition key, e.g. 'tiny-llama|sft-…', or its storage folder name tiny-llama+sft-…",
    )
    p.add_argument("--zone", help="this zone only (else $LAB_GCE_ZONE, else the experiment's)")
    p.add_argument("--machine-type", help="override the machine type ($LAB_GCE_MACHINE_TYPE)")
    p.add_argument("--gpu-type", help="override the GPU type ($LAB_GCE_GPU_TYPE)")
    p.add_argument("--keep-vm", action="store_true", help="leave the VM running afterwards")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the zones / machine types a launch would try, $/h and worst case; create nothing",
    )
    p.add_argument("--body-out", metavar="FILE", help="with --dry-run: write the insert body here")
    _register_vms(subparsers)
    _register_image(subparsers)


def _partition_key(raw: str) -> str:
    """A partition key as Dagster writes it (`model|run`) or as its storage folder is
    named (`model+run`, no shell quoting needed)."""
    return raw if "|" in raw else partition_from_dirname(raw)


def _register_vms(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "vms",
        purpose="List the experiment's lab VMs, or delete those whose run ended or are too old.",
        help="list or reap the experiment's GCE VMs (list|reap)",
        examples=[
            "lab vms list --experiment my-gce.yaml",
            "lab vms reap --experiment my-gce.yaml --dry-run",
        ],
    )
    vsub = p.add_subparsers(dest="vms_cmd", required=True, metavar="{list,reap}")
    fn = _gce_errors(_cmd_vms)
    lst = add_command(
        vsub,
        "list",
        purpose="Every lab VM of the experiment, with a verdict.",
        examples=["lab vms list --experiment my-gce.yaml"],
        fn=fn,
    )
    add_experiment(lst, "$LAB_EXPERIMENT")
    r = add_command(
        vsub,
        "reap",
        purpose="Delete the VMs whose run ended or that are too old.",
        examples=["lab vms reap --experiment my-gce.yaml --max-age-h 6 --dry-run"],
        fn=fn,
    )
    add_experiment(r, "$LAB_EXPERIMENT")
    r.add_argument("--dry-run", action="store_true", help="say what would be deleted")
    r.add_argument("--max-age-h", type=float, help="age limit (default: compute.reap_after_s)")


def _register_image(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "image",
        purpose="Build, archive (teardown) or restore the experiment's pre-baked GCE VM image.",
        help="the GCE VM image (build|teardown|import)",
        examples=[
            "lab image build --experiment my-gce.yaml",
            "lab image teardown --experiment my-gce.yaml",
            "lab image import gs://BUCKET/PREFIX/NAME.tar.gz --experiment my-gce.yaml",
        ],
    )
    isub = p.add_subparsers(dest="image_cmd", required=True, metavar="{build,teardown,import}")
    fn = _gce_errors(_cmd_image)
    b = add_command(
        isub,
        "build",
        purpose="Build the image: temporary VM -> bootstrap -> health check -> image.",
        examples=["lab image build --experiment my-gce.yaml"],
        fn=fn,
    )
    add_experiment(b, "$LAB_EXPERIMENT")
    b.add_argument("--no-require-cuda", action="store_true", help="accept a VM without CUDA")
    b.add_argument("--health-model", help="REPO[@REV] to load in the health check")
    t = add_command(
        isub,
        "teardown",
        purpose="Archive the family's image to GCS, then delete it.",
        examples=["lab image teardown --experiment my-gce.yaml"],
        fn=fn,
    )
    add_experiment(t, "$LAB_EXPERIMENT")
    t.add_argument("--archive", help="gs://.../NAME.tar.gz (default under the staging root)")
    i = add_command(
        isub,
        "import",
        purpose="Restore an archived image into the family.",
        examples=["lab image import gs://BUCKET/PREFIX/NAME.tar.gz"],
        fn=fn,
    )
    add_experiment(i, "$LAB_EXPERIMENT")
    i.add_argument("archive", help="gs://.../NAME.tar.gz written by teardown")
    i.add_argument("--name", help="image name (default: the archived image's)")


def _gce_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A bad value is `lab: <message>` (exit 2); a Compute API error `lab: Compute API: …` (1)."""

    @functools.wraps(fn)
    def wrapped(args: argparse.Namespace) -> int:
        from google.auth.exceptions import DefaultCredentialsError, RefreshError

        try:
            return fn(args)
        except ValueError as e:  # ExperimentError included
            print(f"lab: {e}", file=sys.stderr)
            return 2
        except DefaultCredentialsError as e:
            print(NO_CREDENTIALS.format(why=_first_line(e)), file=sys.stderr)
            return 1
        except RefreshError as e:
            print(
                NO_CREDENTIALS.format(why=f"they could not be refreshed: {_first_line(e)}"),
                file=sys.stderr,
            )
            return 1
        except Exception as e:
            from resources.compute.gce.errors import GceApiError

            if isinstance(e, GceApiError):
                print(
                    f"lab: Compute API: {e} (`lab doctor` checks the project's setup)",
                    file=sys.stderr,
                )
                return 1
            raise

    return wrapped


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__).rstrip(".")


def gce_main(argv: list[str]) -> int:
    """`lab launch|vms|image ...` (argv includes the command name), through the same
    `register` as the `lab` tree but without loading the other command groups."""
    return run(build_tree("The GCE commands of `lab`.", [register]).parse_args(argv))
