"""Warm VMs, the launcher's side: a step's VM shape, the VM's warm instructions, claiming one.

A VM whose step ended offers itself (``resources.remote.agent_warm``) under
``<staging>/_gce/warm/offers/<shape>/<vm>.json`` for ``idle_minutes``. The *shape* is
a hash of everything that makes two steps' VMs interchangeable: project, the
zone / machine-type / GPU candidates (so zone policy and per-run overrides count),
spot, the image families, boot disk, service account, network, and the code bundle
(the wheel's hash, or ``skip``). A launcher with a step of that shape claims an
offer by creating ``claims/<vm>/<seq>.json`` with ``ifGenerationMatch=0`` and the
step's instructions in it; the VM retiring races for the same object, so exactly
one wins. A claimed VM starts the step within one poll interval; the launcher then
follows it like a VM it booted.

An offer is skipped when its VM has not refreshed it lately (the agent is gone) or
when the VM has less than half of ``max_run_duration_s`` left before its dead-man
switch (a step must not start on a VM about to be deleted under it).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resources.compute.gce import objects
from resources.compute.gce.gcs import Gcs
from resources.compute.gce.placement import Placement
from resources.compute.gce.settings import LaunchSettings
from resources.remote.protocol import CLAIMS_DIR, OFFERS_DIR


def bundle_hash(wheel: Path | None) -> str:
    """What code a VM runs: the wheel's content hash, or ``skip`` (the image has the code)."""
    if wheel is None:
        return "skip"
    return hashlib.sha256(wheel.read_bytes()).hexdigest()[:16]


def shape_of(s: LaunchSettings, bundle: str) -> str:
    facts = {
        "project": s.project,
        "candidates": [[p.zone, p.machine_type, p.gpu_type, p.gpu_count] for p in s.placements()],
        "spot": s.spot,
        "image": [
            s.image_family,
            s.image_project,
            s.fallback_image_family,
            s.fallback_image_project,
        ],
        "boot_disk_gb": s.boot_disk_gb,
        "service_account": s.service_account,
        "network": [s.network, s.subnetwork, s.external_ip],
        "bundle": [s.bundle_install, bundle],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def min_life_s(s: LaunchSettings) -> float:
    return s.max_run_duration_s / 2


def warm_block(
    s: LaunchSettings,
    *,
    shape: str,
    endpoint: str | None,
    placement: Placement,
    price: float | None,
    created_at: float,
    ledger_uri: str | None,
    ledger_facts: dict[str, Any],
) -> dict[str, Any]:
    """The ``warm`` part of a VM's instructions (read by ``agent_warm``)."""
    offer = {
        "zone": placement.zone,
        "machine_type": placement.machine_type,
        "gpu_type": placement.gpu_type,
        "gpu_count": placement.gpu_count,
        "hourly_usd": price,
        "created_at": created_at,
        "ledger_key": ledger_facts.get("key"),
    }
    ledger = None
    if price is not None and ledger_uri:
        ledger = {
            "uri": ledger_uri,
            "hourly_usd": price,
            "created_at": created_at,
            "facts": {k: v for k, v in ledger_facts.items() if k != "key"},
        }
    return {
        "staging": s.staging,
        "shape": shape,
        "idle_s": s.idle_minutes * 60,
        "lease_ttl_s": s.lease_ttl_s,
        "poll_s": s.poll_interval_s,
        "heartbeat_s": s.heartbeat_s,
        "deadline": created_at + s.max_run_duration_s,
        "min_life_s": min_life_s(s),
        "compute_endpoint": endpoint,
        "offer": offer,
        "ledger": ledger,
    }


@dataclass(frozen=True)
class Offer:
    """An idle VM this launcher has claimed."""

    vm: str
    seq: int
    placement: Placement
    hourly_usd: float | None
    created_at: float
    ledger_key: str | None


def pickup_s(s: LaunchSettings) -> float:
    """How long a claimed VM may take to start the step it was handed (it polls its claim
    every poll interval and heart-beats every ``heartbeat_s``)."""
    return 3 * s.heartbeat_s + 5 * s.poll_interval_s + 5


def offer_fresh_s(s: LaunchSettings) -> float:
    """How old an offer's last refresh may be: the agent rewrites it every heartbeat."""
    return 3 * s.heartbeat_s + 2 * s.poll_interval_s


def claim(
    gcs: Gcs,
    s: LaunchSettings,
    shape: str,
    step_for: Callable[[Offer], dict[str, Any]],
    by: str,
) -> Offer | None:
    """Claim an idle VM of `shape`, handing it the instructions `step_for(offer)`; None if
    no VM is on offer (or every one was taken, or retired, first)."""
    fresh = offer_fresh_s(s)
    for uri in gcs.list(f"{s.staging}/{OFFERS_DIR}/{shape}"):
        o = gcs.read_json(uri)
        now = time.time()
        if not o or now - float(o.get("t", 0)) > fresh:
            if o and now - float(o.get("t", 0)) > s.heartbeat_timeout_s:
                objects.delete(gcs, uri)  # its VM died idle: nobody else will clear it
            continue
        if o.get("deadline") and float(o["deadline"]) - now < min_life_s(s):
            continue
        offer = Offer(
            vm=o["vm"],
            seq=int(o["seq"]),
            placement=Placement(o["zone"], o["machine_type"], o["gpu_type"], int(o["gpu_count"])),
            hourly_usd=o.get("hourly_usd"),
            created_at=float(o.get("created_at") or now),
            ledger_key=o.get("ledger_key"),
        )
        claim_uri = f"{s.staging}/{CLAIMS_DIR}/{offer.vm}/{offer.seq}.json"
        body = {"step": step_for(offer), "by": by, "t": now}
        if objects.create_json(gcs, claim_uri, body):
            return offer
        # else another launcher, or the VM retiring, won this one
    return None
