"""What a step running on a GCE VM knows about that VM, as materialisation metadata.

The launcher puts the launch facts (VM name, zone, machine and GPU type, spot or
on-demand, hourly price, preemptions survived, VM seconds of earlier attempts, the
VM's start time) into the agent's instructions; the agent hands them to the step
as JSON in ``LAB_GCE_LAUNCH_INFO``; the IO manager adds them to every output's
metadata, so they show on the materialisation in the Dagster UI. VM seconds and
cost there are as of the moment the output was stored; the launcher logs an
asset observation with the final figures once the VM is gone.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from resources.remote.protocol import LAUNCH_INFO_ENV

PREFIX = "gce/"


def current() -> dict[str, Any] | None:
    raw = os.environ.get(LAUNCH_INFO_ENV)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    return info or None


def as_metadata(info: dict[str, Any], *, vm_seconds: float, cost_usd: float | None) -> dict:
    """The `gce/...` metadata entries for a launch (plain values; Dagster wraps them)."""
    out = {
        f"{PREFIX}vm_name": info.get("vm_name", ""),
        f"{PREFIX}zone": info.get("zone", ""),
        f"{PREFIX}machine_type": info.get("machine_type", ""),
        f"{PREFIX}gpu": f"{info.get('gpu_count', 0)} x {info.get('gpu_type', '')}",
        f"{PREFIX}provisioning": "spot" if info.get("spot") else "on-demand",
        f"{PREFIX}preemptions": int(info.get("preemptions", 0)),
        f"{PREFIX}vm_seconds": round(float(vm_seconds), 1),
        f"{PREFIX}hourly_usd": info.get("hourly_usd"),
    }
    if cost_usd is not None:
        out[f"{PREFIX}cost_usd"] = round(cost_usd, 6)
    return {k: v for k, v in out.items() if v is not None}


def output_metadata() -> dict[str, Any]:
    """Metadata for an output stored now, on a GCE VM; empty elsewhere."""
    info = current()
    if info is None:
        return {}
    this_vm = max(0.0, time.time() - float(info.get("vm_started_at", time.time())))
    seconds = float(info.get("previous_vm_seconds", 0.0)) + this_vm
    price = info.get("hourly_usd")
    cost = None
    if price is not None:
        cost = float(info.get("previous_cost_usd", 0.0)) + this_vm / 3600.0 * float(price)
    return as_metadata(info, vm_seconds=seconds, cost_usd=cost)
