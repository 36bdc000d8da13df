"""Refresh resources/compute/gce/gcp_catalog.csv from SkyPilot's public GCP catalog.

The launcher prices VMs from that vendored, dated file (``resources/compute/gce/catalog.py``);
prices move, so re-vendor it now and then and review the diff:

    python scripts/refresh_gcp_catalog.py [--url URL] [--regions us-central1,...] [--dry-run]

It downloads SkyPilot's ``catalogs/v7/gcp/vms.csv`` (needs internet), keeps the machine
types with built-in GPUs that the lab knows (``catalog.FIXED_GPUS``: G2, A2, A3) and the
one-GPU rows of the GPUs it maps (``catalog.GPU_TYPES``), in the given regions, and
rewrites the file with a header naming the source and today's date. Stdlib only.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resources.compute.gce.catalog import CATALOG_FILE, FIXED_GPUS, GPU_TYPES  # noqa: E402

URL = (
    "https://raw.githubusercontent.com/skypilot-org/skypilot-catalog/master/catalogs/v7/gcp/vms.csv"
)
REGIONS = "us-central1,us-east1,us-east4,us-west1,europe-west4"
COLUMNS = [
    "InstanceType",
    "vCPUs",
    "MemoryGiB",
    "AcceleratorName",
    "AcceleratorCount",
    "Region",
    "AvailabilityZone",
    "Price",
    "SpotPrice",
]


def _num(v: str) -> str:
    """`12.0` -> `12` (as vendored), other values unchanged."""
    try:
        f = float(v)
    except ValueError:
        return v
    return str(int(f)) if f.is_integer() and "." in v and len(v) < 8 else v


def select(text: str, regions: set[str]) -> list[list[str]]:
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        if r.get("Region") not in regions:
            continue
        machine = r.get("InstanceType") or ""
        gpu_row = not machine and r.get("AcceleratorName") in GPU_TYPES
        if gpu_row and r.get("AcceleratorCount", "").split(".")[0] != "1":
            continue
        if machine not in FIXED_GPUS and not gpu_row:
            continue
        rows.append([_num(r.get(c) or "") for c in COLUMNS])
    rows.sort(key=lambda x: (x[0] == "", x[0] or x[3], x[6]))
    return rows


def header(url: str, regions: str) -> str:
    today = datetime.now(UTC).date().isoformat()
    return f"""# GCP prices per hour (USD) for the machine types and GPUs the lab launches: a trimmed copy
# of SkyPilot's public catalog (columns as there, minus GpuInfo).
# source: {url}
# catalog commit: (master at download); vendored: {today}
# kept: machine types with built-in GPUs (catalog.FIXED_GPUS) and one-GPU rows of
#   {", ".join(GPU_TYPES)}, in {regions}.
# A machine-type row prices the VM without its GPUs; a GPU row prices one GPU; a VM-hour costs
#   machine + gpu_count x GPU (SkyPilot's rows for 2, 4, 8 GPUs are that multiple).
# Prices change: refresh with `python scripts/refresh_gcp_catalog.py` (needs internet), then
#   review the diff. An experiment may override any price with compute.hourly_usd.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=URL)
    p.add_argument("--regions", default=REGIONS, help="comma-separated GCP regions to keep")
    p.add_argument("--out", type=Path, default=CATALOG_FILE)
    p.add_argument("--dry-run", action="store_true", help="print the rows, write nothing")
    args = p.parse_args(argv)
    with urllib.request.urlopen(args.url, timeout=120) as resp:  # noqa: S310 - a fixed https URL
        text = resp.read().decode()
    rows = select(text, set(args.regions.split(",")))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(rows)
    if args.dry_run:
        print(out.getvalue(), end="")
    else:
        args.out.write_text(header(args.url, args.regions) + out.getvalue())
        print(f"wrote {len(rows)} rows to {args.out}; review the diff before committing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
