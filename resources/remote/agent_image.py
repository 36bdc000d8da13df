"""The VM agent's ``image-build`` and ``export-disk`` modes (they make the lab's image).

Split out of ``agent`` (it ships to the VM beside it; stdlib and
google-cloud-storage only). ``image-build`` installs the bundle with its
dependencies, runs the health check (torch imports, CUDA works, the base model
loads, the bundle's packages import) and uploads the report. ``export-disk``
streams an attached disk to GCS as ``disk.tar.gz`` holding ``disk.raw``, the
format ``images.insert`` with ``rawDisk.source`` restores from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from resources.remote.protocol import DEVICE_ROOT_ENV, make_storage_client, parse_gs_uri

HEALTH_CHECK = r"""
import json, sys, time
args = json.loads(sys.argv[1])
t0 = time.time()
out = {"ok": False}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = bool(torch.cuda.is_available())
    if out["cuda"]:
        out["device"] = torch.cuda.get_device_name(0)
        x = torch.ones(256, 256, device="cuda")
        out["cuda_matmul"] = float((x @ x).sum().item())
    if args.get("model"):
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(args["model"], revision=args.get("revision"))
        out["model_params"] = sum(p.numel() for p in m.parameters())
    import importlib
    for name in args.get("import_modules") or ():  # the bundle's packages import
        importlib.import_module(name)
    out["ok"] = out["cuda"] or not args.get("require_cuda", True)
    if not out["ok"]:
        out["error"] = "CUDA is not available"
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
out["seconds"] = round(time.time() - t0, 2)
print(json.dumps(out))
"""


def run_image_build(instr: dict[str, Any], home: Path) -> int:
    client = make_storage_client()
    bucket_name, report = parse_gs_uri(instr["report_uri"])
    bucket = client.bucket(bucket_name)
    report_body: dict[str, Any] = {"ok": False}
    try:
        if instr.get("bundle_install", "pip") != "skip":
            b_bucket, b_prefix = parse_gs_uri(instr["bundle_uri"])
            wheels = [
                b
                for b in client.list_blobs(b_bucket, prefix=b_prefix + "/")
                if b.name.endswith(".whl")
            ]
            local = home / wheels[0].name.rsplit("/", 1)[-1]
            home.mkdir(parents=True, exist_ok=True)
            wheels[0].download_to_filename(str(local))
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(local)], check=True)
        args = {
            "require_cuda": instr.get("require_cuda", True),
            "model": instr.get("health_model"),
            "revision": instr.get("health_model_revision"),
            "import_modules": instr.get("import_modules") or [],
        }
        env = dict(os.environ)
        if instr.get("bundle_install") == "skip":
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (os.getcwd(), env.get("PYTHONPATH")) if p
            )
        res = subprocess.run(
            [sys.executable, "-c", HEALTH_CHECK, json.dumps(args)],
            capture_output=True,
            text=True,
            env=env,
        )
        lines = res.stdout.strip().splitlines()
        report_body = json.loads(lines[-1]) if lines else {"ok": False}
        if res.returncode != 0 or not lines:
            report_body.setdefault("error", res.stderr[-2000:])
    except Exception as e:
        report_body = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    bucket.blob(report).upload_from_string(json.dumps(report_body), "application/json")
    print(f"[agent] health report: {report_body}")
    return 0 if report_body.get("ok") else 1


def run_export_disk(instr: dict[str, Any]) -> int:
    """Stream the attached disk into GCS as a tar.gz holding ``disk.raw``."""
    client = make_storage_client()
    device = Path(os.environ.get(DEVICE_ROOT_ENV, "/dev/disk/by-id")) / (
        "google-" + instr["device_name"]
    )
    bucket_name, name = parse_gs_uri(instr["archive_uri"])
    bucket = client.bucket(bucket_name)
    report = {"ok": False}
    try:
        with open(device, "rb") as src:
            size = os.lseek(src.fileno(), 0, os.SEEK_END)
            os.lseek(src.fileno(), 0, os.SEEK_SET)
            with bucket.blob(name).open("wb", content_type="application/x-tar") as out:
                # GNU format: the rawDisk import expects the tar `--format=oldgnu` writes.
                with tarfile.open(fileobj=out, mode="w|gz", format=tarfile.GNU_FORMAT) as tar:
                    info = tarfile.TarInfo("disk.raw")
                    info.size = size
                    tar.addfile(info, src)
        report = {"ok": True, "bytes": size, "archive_uri": instr["archive_uri"]}
    except Exception as e:
        report = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    _, report_name = parse_gs_uri(instr["report_uri"])
    bucket.blob(report_name).upload_from_string(json.dumps(report), "application/json")
    print(f"[agent] export report: {report}")
    return 0 if report["ok"] else 1
