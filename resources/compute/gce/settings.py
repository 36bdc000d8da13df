"""The GCE launcher's settings: one model, from the experiment file to the running launch.

Every knob of a step launched on GCE (project, zones, machine and GPU types, image,
scheduling, prices, timings) is one field of ``GceSettings``, a plain pydantic
model with its bounds and validators. The same class serves three readers:

- the experiment schema: ``compute: {kind: gce, ...}`` is ``GceSettings`` plus
  ``kind`` (``lab_assets.experiment.schema.GceCompute``), so the YAML is checked
  field by field, unknown keys refused;
- the Dagster resource: ``GceStepLauncherResource`` inherits ``LaunchSettings``,
  so each field is a top-level field of ``resources.step_launcher.config`` that a
  run may set (its fields are inherited, not nested, because Dagster's
  ``configure_at_launch`` keeps no default for a nested config object);
- the launch itself, which reads a ``LaunchSettings``.

``LaunchSettings`` adds what a launch needs that is not a GCE setting: the storage
root, the experiment's name and file, the budget, and the per-run placement
overrides ``zone``, ``machine_type_override``, ``gpu_type_override`` (run config,
else ``LAB_GCE_ZONE`` / ``LAB_GCE_MACHINE_TYPE`` / ``LAB_GCE_GPU_TYPE``; see
``placement``). ``keep_vm`` is a setting and a run may override it like any other.

A new knob is one field here (plus the code that uses it).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from resources.compute.gce.catalog import fixed_gpus, hourly_price, mismatched
from resources.compute.gce.placement import Overrides, Placement, candidates
from resources.compute.gce.vm_spec import DLVM_FAMILY, DLVM_PROJECT

_ZONE = re.compile(r"[a-z]+-[a-z]+\d+-[a-z]")
_IMAGE_FAMILY = r"^[a-z][a-z0-9-]{0,62}$"
# Upper bounds (every number has one; floats are finite): generous, but a typo such as
# `max_run_duration_s: 1e20` is refused with the bound in the message.
_DAY_S = 24 * 3600
_MAX_DURATION_S = 30 * _DAY_S
_MAX_PACE_S = 3600.0  # a poll, flush, heartbeat or grace interval
_MAX_USD = 1_000_000.0


class GceSettings(BaseModel):
    """Disposable GCE VMs for GPU steps: where, what shape, what image, what it may cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str = Field(pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
    zones: list[str] = Field(min_length=1, max_length=128)
    machine_type: str = Field(min_length=1, max_length=128)
    gpu_type: str = Field(min_length=1, max_length=128)
    # GPUs per VM for machine types that attach GPUs (N1); A2/A3/G2 machine types carry
    # their own count (catalog.FIXED_GPUS), whatever this says.
    gpu_count: int = Field(1, ge=1, le=16)
    # GPU types tried after every candidate of `gpu_type`, each with its gpu_zones entry.
    fallback_gpu_types: list[str] = Field(default_factory=list, max_length=8)
    spot: bool = True
    image_family: str = Field("task-geometry-lab", pattern=_IMAGE_FAMILY)
    image_project: str | None = None
    # A Deep Learning VM image family used when `image_family` has no image yet.
    fallback_image_family: str = Field(DLVM_FAMILY, pattern=_IMAGE_FAMILY)
    fallback_image_project: str = DLVM_PROJECT
    boot_disk_gb: int = Field(100, ge=10, le=65_536)
    max_run_duration_s: int = Field(4 * 3600, ge=60, le=_MAX_DURATION_S)
    max_preemptions: int = Field(3, ge=0, le=1000)
    service_account: str | None = None
    # The VM's network interface: a network (and, for custom-mode VPCs, a subnetwork,
    # e.g. "regions/us-central1/subnetworks/lab"), with or without an external IP
    # (without one the VM needs Cloud NAT or Private Google Access to reach pip and GCS).
    network: str = Field("global/networks/default", min_length=1, max_length=1024)
    subnetwork: str | None = Field(None, max_length=1024)
    external_ip: bool = True
    # Prices come from the dated catalog (resources/compute/gce/gcp_catalog.csv) per zone;
    # this optional table overrides them, keyed by machine type and by GPU type (per GPU);
    # "<name>:spot" keys give spot prices. A VM-hour costs machine + gpu_count x gpu.
    hourly_usd: dict[str, float] = Field(default_factory=dict)
    # Where each GPU can be had: {gpu_type: {zone: [machine types]}}, in preference
    # order; zone failover walks it (within `zones`).
    gpu_zones: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    # Leave the VM running after the step (to ssh in); the reaper deletes it after
    # keep_vm_hours, maxRunDuration in any case.
    keep_vm: bool = False
    keep_vm_hours: float = Field(2.0, gt=0, le=_MAX_DURATION_S / 3600, allow_inf_nan=False)
    # Warm VMs: after its step a VM offers itself this long to the next step of the same
    # shape (machine, GPUs, image, code bundle, spot, zones), then deletes itself; 0: one
    # VM per step, deleted by the launcher when its step ends (see ``warm``).
    idle_minutes: float = Field(5.0, ge=0, le=24 * 60, allow_inf_nan=False)
    # An orchestrator's lease (its heartbeat in GCS) counts as live this long after its
    # last beat; a VM stays warm only while some lease is live, and deletes itself after
    # its step when none is (the orchestrator is gone).
    lease_ttl_s: float = Field(120.0, gt=0, le=_DAY_S, allow_inf_nan=False)
    # The reaper deletes lab VMs older than this (default: max_run_duration_s + 10 min).
    reap_after_s: int | None = Field(None, ge=60, le=_MAX_DURATION_S)
    # Where launches stage their files (default: <storage root>/<experiment>).
    staging_root: str | None = None
    require_gcs_storage: bool = True
    # "pip": ship a wheel of the working tree; "skip": the image already has the code.
    # (A str, not a Literal: Dagster turns a Literal into an enum whose schema default
    # hides the value given to ``configure_at_launch``.)
    bundle_install: str = "pip"
    env: dict[str, str] = Field(default_factory=dict)  # extra environment for the step
    api_endpoint: str | None = None
    # How the launcher and the agent pace themselves.
    poll_interval_s: float = Field(2.0, gt=0, le=_MAX_PACE_S, allow_inf_nan=False)
    flush_interval_s: float = Field(2.0, gt=0, le=_MAX_PACE_S, allow_inf_nan=False)
    heartbeat_s: float = Field(15.0, gt=0, le=_MAX_PACE_S, allow_inf_nan=False)
    heartbeat_timeout_s: float = Field(180.0, gt=0, le=_DAY_S, allow_inf_nan=False)
    boot_timeout_s: float = Field(1200.0, gt=0, le=_DAY_S, allow_inf_nan=False)
    instance_check_s: float = Field(15.0, gt=0, le=_MAX_PACE_S, allow_inf_nan=False)
    grace_s: float = Field(20.0, gt=0, le=_MAX_PACE_S, allow_inf_nan=False)
    checkpoint_sync_s: float = Field(30.0, gt=0, le=_DAY_S, allow_inf_nan=False)
    preempted_poll_s: int = Field(30, gt=0, le=int(_MAX_PACE_S))

    @field_validator("zones")
    @classmethod
    def _zones(cls, v: list[str]) -> list[str]:
        for z in v:
            if not _ZONE.fullmatch(z):
                raise ValueError(f"{z!r} is not a zone name like 'us-central1-a'")
        return v

    @field_validator("hourly_usd")
    @classmethod
    def _prices(cls, v: dict[str, float]) -> dict[str, float]:
        for key, price in v.items():
            if not 0 <= price <= _MAX_USD:  # also refuses nan and inf
                raise ValueError(
                    f"{key}: price {price} is not a finite number from 0 to {_MAX_USD}"
                )
        return v

    @field_validator("bundle_install")
    @classmethod
    def _bundle_install(cls, v: str) -> str:
        if v not in ("pip", "skip"):
            raise ValueError(f"bundle_install must be 'pip' or 'skip', not {v!r}")
        return v

    @field_validator("gpu_zones")
    @classmethod
    def _gpu_zones(cls, v: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
        for gpu, by_zone in v.items():
            for z, types in by_zone.items():
                if not _ZONE.fullmatch(z):
                    raise ValueError(f"{gpu}: {z!r} is not a zone name like 'us-central1-a'")
                if not types:
                    raise ValueError(f"{gpu}.{z}: list at least one machine type")
        return v

    @model_validator(mode="after")
    def _gpu_reachable(self) -> GceSettings:
        registry = self.gpu_zones.get(self.gpu_type)
        if registry is not None and not set(registry) & set(self.zones):
            raise ValueError(
                f"gpu_zones.{self.gpu_type} lists no zone of `zones` {list(self.zones)}"
            )
        fixed = fixed_gpus(self.machine_type)
        if fixed and fixed[0] != self.gpu_type:
            raise ValueError(
                f"machine_type {self.machine_type} comes with {fixed[1]} x {fixed[0]}, "
                f"not {self.gpu_type}"
            )
        for gpu in self.fallback_gpu_types:
            if gpu not in self.gpu_zones:
                raise ValueError(
                    f"fallback_gpu_types: {gpu!r} needs a gpu_zones entry naming its zones "
                    "and machine types"
                )
        for gpu, by_zone in self.gpu_zones.items():
            for z, types in by_zone.items():
                if bad := mismatched(types, gpu):
                    raise ValueError(
                        f"gpu_zones.{gpu}.{z}: {', '.join(bad)} cannot host {gpu} "
                        f"(built-in GPU: {', '.join(fixed_gpus(m)[0] for m in bad)})"
                    )
        return self

    @property
    def reap_after(self) -> int:
        return self.reap_after_s or self.max_run_duration_s + 600

    def price(self, p: Placement) -> float:
        """The hourly price of a VM at `p` (raises ``PriceMissing`` without one)."""
        return hourly_price(
            self.hourly_usd, p.machine_type, p.zone, p.gpu_type, p.gpu_count, self.spot
        )


class LaunchSettings(GceSettings):
    """The settings plus what a launch is for: storage, experiment, budget, per-run overrides."""

    storage_root: str
    experiment: str
    experiment_file: str | None = None
    budget_usd: float = Field(0.0, ge=0, le=_MAX_USD, allow_inf_nan=False)
    zone: str | None = Field(None, description="run this step in this zone only")
    machine_type_override: str | None = None
    gpu_type_override: str | None = None

    @property
    def staging(self) -> str:
        root = self.staging_root or f"{self.storage_root.rstrip('/')}/{self.experiment}"
        if not root.startswith("gs://"):
            raise ValueError(
                f"GCE launches stage through GCS: storage root {self.storage_root!r} is not "
                "gs://bucket/prefix (set the experiment's storage or LAB_STORAGE_ROOT)"
            )
        return root.rstrip("/")

    def overrides(self) -> Overrides:
        return Overrides.resolve(self.zone, self.machine_type_override, self.gpu_type_override)

    def placements(self, avoid: tuple[str, ...] = ()) -> list[Placement]:
        return candidates(
            self.zones,
            self.machine_type,
            self.gpu_type,
            self.gpu_count,
            self.gpu_zones,
            self.overrides(),
            avoid,
            self.fallback_gpu_types,
        )
