"""`lab launch --dry-run`: what a launch would try and what it could cost, touching nothing.

A researcher deciding whether to launch wants the order of zones and machine types
the launcher would walk, the GPUs each gets, spot or on-demand, the hourly price and
the worst case (``maxRunDuration`` x price, the dead-man switch's limit) against the
budget: that is the table. The full ``instances.insert`` body is long (the agent's
sources ride in its metadata), so it is written only when asked, to a file
(``--body-out FILE``). No credentials, no Compute API or GCS call: prices come from
the vendored catalog (``resources/compute/gce/catalog.py``) and the experiment's
``hourly_usd`` overrides.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lab_assets.defs.resources import gce_settings

if TYPE_CHECKING:
    from lab_assets.experiment.resolved import Experiment
    from resources.compute.gce.placement import Placement
    from resources.compute.gce.settings import LaunchSettings

DRY_RUN_ID = "dry-run"


def dry_run_body(exp: Experiment, asset: str, partition: str, **overrides: Any) -> dict:
    """The instances.insert body a launch of (asset, partition) would send, without any API call.

    The image is given as its family (``.../global/images/family/F``, which the API
    accepts); a real launch resolves the family's newest image with
    ``images.getFromFamily`` and falls back to the Deep Learning VM family.
    """
    from resources.compute.gce.step_vm import build_vm_spec, safe_step_key
    from resources.compute.gce.vm_spec import build_instance, instance_json, vm_name

    s = gce_settings(exp, **overrides)
    placement = s.placements()[0]
    name = vm_name(exp.name, DRY_RUN_ID, asset, 1)
    spec = build_vm_spec(
        s,
        placement=placement,
        name=name,
        source_image=f"projects/{s.image_project or s.project}/global/images/family/{s.image_family}",
        prebaked=True,
        launch_uri=f"{s.staging}/_launches/{DRY_RUN_ID}/{safe_step_key(asset)}",
        attempt=1,
        run_id=DRY_RUN_ID,
        step_key=asset,
        partition=partition,
        launch_info={
            "vm_name": name,
            "zone": placement.zone,
            "machine_type": placement.machine_type,
            "gpu_type": placement.gpu_type,
            "gpu_count": placement.gpu_count,
            "spot": s.spot,
            "hourly_usd": _price(s, placement),
            "preemptions": 0,
            "previous_vm_seconds": 0.0,
            "previous_cost_usd": 0.0,
            "vm_started_at": 0.0,
        },
    )
    return json.loads(instance_json(build_instance(spec)))


def _price(s: LaunchSettings, p: Placement) -> float | None:
    from resources.compute.gce.costs import PriceMissing

    try:
        return s.price(p)
    except PriceMissing:
        return None


def dry_run_table(exp: Experiment, asset: str, partition: str, **overrides: Any) -> str:
    """The placements a launch would try, in order, with $/h and worst case vs the budget."""
    from resources.compute.gce.catalog import default_catalog

    s = gce_settings(exp, **overrides)
    hours = s.max_run_duration_s / 3600
    rows = [(p, _price(s, p)) for p in s.placements()]
    project = s.project + (" (placeholder)" if exp.placeholders else "")
    lines = [
        f"dry run: {asset}[{partition}] of {exp.name} on GCE, project {project}: nothing created",
        f"order of VMs a launch would try ({'spot' if s.spot else 'on-demand'}, "
        f"maxRunDuration {hours:.2f} h = the worst case):",
        f"  {'#':>2}  {'zone':16s} {'machine type':16s} {'GPUs':22s} {'$/h':>7s} {'worst case':>10s}",
    ]
    for i, (p, price) in enumerate(rows, 1):
        gpus = f"{p.gpu_count} x {p.gpu_type}" if p.gpu_count else "none"
        cost = (
            f"{price:7.3f} {price * hours:10.2f}" if price is not None else f"{'?':>7s} {'?':>10s}"
        )
        lines.append(f"  {i:2d}  {p.zone:16s} {p.machine_type:16s} {gpus:22s} {cost}")
    lines.append(_budget_line(s, rows, hours))
    lines.append(
        f"prices: catalog {default_catalog().source}"
        + (" (compute.hourly_usd overrides some)" if s.hourly_usd else "")
    )
    if exp.placeholders:
        lines.append(
            f"placeholders in use: {', '.join(exp.placeholders)} (set them before a real launch)"
        )
    lines.append("the instances.insert body: --body-out FILE writes it (JSON)")
    return "\n".join(lines)


def _budget_line(s: LaunchSettings, rows: list[tuple[Placement, float | None]], hours: float):
    priced = [price * hours for _, price in rows if price is not None]
    missing = len(rows) - len(priced)
    if s.budget_usd <= 0:
        verdict = "no budget set (budget.max_usd: 0)"
    elif not priced:
        verdict = f"budget ${s.budget_usd:.2f}: no price known, a launch would be refused"
    else:
        first, dearest = priced[0], max(priced)
        fits = "fits" if first <= s.budget_usd else "EXCEEDS it: a launch would be refused"
        verdict = (
            f"budget ${s.budget_usd:.2f}: the first choice's worst case ${first:.2f} {fits}; "
            f"dearest ${dearest:.2f}"
            + (f" (about {int(s.budget_usd // dearest)} such VM-runs)" if dearest > 0 else "")
            + "; spent so far is in the GCS ledger, not read by a dry run"
        )
    if missing:
        verdict += f"; {missing} candidate(s) without a price (set compute.hourly_usd)"
    return verdict
