"""The fake Compute Engine's project side: ``projects.get``, ``regions.get``, a disabled API.

Split out of ``fake_compute`` as a mixin of ``FakeCompute``, for `lab doctor`'s tests.
Shapes as real GCE answers them: ``projects.get`` has ``quotas`` (``GPUS_ALL_REGIONS``,
``CPUS_ALL_REGIONS``, ...) and ``defaultServiceAccount``
(``NUMBER-compute@developer.gserviceaccount.com``); ``regions.get`` has ``quotas``
per metric (``NVIDIA_L4_GPUS``, ``PREEMPTIBLE_NVIDIA_L4_GPUS``, ``CPUS``, ...) with a
``usage`` counted from the fake's live VMs; a region the catalog does not know is a
404. The defaults are a project that was granted GPU quota (8 of each GPU, standard
and preemptible, in every region); a test sets ``project_quotas`` or
``region_quotas[region][metric]`` to model a new project (``GPUS_ALL_REGIONS`` = 0)
and calls ``reset_project()`` after.

``disabled_services`` holds the APIs "not enabled" in the project: with
``compute.googleapis.com`` in it, every Compute call is the 403 GCE answers then
(reason ``accessNotConfigured``, "Compute Engine API has not been used in project
... before or it is disabled"). ``fake_gcp_admin`` reads the same set for Service
Usage.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lab_assets_tests.fakes.fake_compute_wire import API, ApiError
from resources.compute.gce.catalog import default_catalog, fixed_gpus

if TYPE_CHECKING:
    from lab_assets_tests.fakes.fake_metadata import FakeInstance

PROJECT_NUMBER = "123456789012"
GPU_METRICS = {
    "nvidia-l4": "NVIDIA_L4_GPUS",
    "nvidia-tesla-a100": "NVIDIA_A100_GPUS",
    "nvidia-a100-80gb": "NVIDIA_A100_80GB_GPUS",
    "nvidia-h100-80gb": "NVIDIA_H100_GPUS",
    "nvidia-tesla-t4": "NVIDIA_T4_GPUS",
}
_PROJECT = re.compile(r"^/compute/v1/projects/([^/]+)$")
_REGION = re.compile(r"^/compute/v1/projects/([^/]+)/regions/([^/]+)$")


def default_service_account(number: str = PROJECT_NUMBER) -> str:
    return f"{number}-compute@developer.gserviceaccount.com"


class ProjectAndRegions:
    """`FakeCompute`'s project and region routes; expects its `instances`."""

    instances: dict[tuple[str, str, str], FakeInstance]

    def reset_project(self) -> None:
        """A project with GPU quota and every API enabled."""
        self.disabled_services: set[str] = set()
        self.project_quotas: dict[str, float] = {
            "GPUS_ALL_REGIONS": 8.0,
            "CPUS_ALL_REGIONS": 256.0,
            "INSTANCES": 1000.0,
        }
        self.region_quotas: dict[str, dict[str, float]] = {}  # region -> metric -> limit
        self.default_region_quota = 8.0

    def _refuse_disabled(self, path: str) -> None:
        if "compute.googleapis.com" in self.disabled_services and path.startswith("/compute/v1/"):
            project = path.split("/")[4] if path.count("/") >= 4 else "?"
            raise ApiError(
                403,
                "accessNotConfigured",
                f"Compute Engine API has not been used in project {project} before or it is "
                "disabled. Enable it by visiting https://console.developers.google.com/apis/api/"
                f"compute.googleapis.com/overview?project={project} then retry.",
                domain="usageLimits",
            )

    def _project_route(self, method: str, path: str) -> tuple[int, dict] | None:
        """The answer to projects.get / regions.get, else None (another route's)."""
        self._refuse_disabled(path)
        if method != "GET":
            return None
        if m := _PROJECT.match(path):
            return 200, self._project_body(m.group(1))
        if m := _REGION.match(path):
            return 200, self._region_body(*m.groups())
        return None

    def _project_body(self, project: str) -> dict:
        gpus = sum(self._gpus(inst)[1] for inst in self._live())
        usage = {"GPUS_ALL_REGIONS": gpus, "INSTANCES": len(self._live())}
        return {
            "kind": "compute#project",
            "id": PROJECT_NUMBER,
            "name": project,
            "selfLink": f"{API}/projects/{project}",
            "defaultServiceAccount": default_service_account(),
            "quotas": [
                {"metric": k, "limit": v, "usage": float(usage.get(k, 0))}
                for k, v in self.project_quotas.items()
            ],
        }

    def _region_body(self, project: str, region: str) -> dict:
        zones = sorted(z for z in default_catalog().zones if z.rsplit("-", 1)[0] == region)
        if not zones:
            raise ApiError(
                404,
                "notFound",
                f"The resource 'projects/{project}/regions/{region}' was not found",
            )
        metrics = ["CPUS"] + [
            m for std in GPU_METRICS.values() for m in (std, f"PREEMPTIBLE_{std}")
        ]
        usage: dict[str, float] = {}
        for inst in self._live():
            if inst.zone.rsplit("-", 1)[0] != region:
                continue
            gpu, n = self._gpus(inst)
            if gpu in GPU_METRICS:
                spot = (inst.body.get("scheduling") or {}).get("provisioningModel") == "SPOT"
                metric = f"PREEMPTIBLE_{GPU_METRICS[gpu]}" if spot else GPU_METRICS[gpu]
                if spot and self._limit(region, metric) == 0:  # no preemptible quota
                    metric = GPU_METRICS[gpu]
                usage[metric] = usage.get(metric, 0) + n
        return {
            "kind": "compute#region",
            "id": str(abs(hash(region)) % 10**12),
            "name": region,
            "status": "UP",
            "selfLink": f"{API}/projects/{project}/regions/{region}",
            "zones": [f"{API}/projects/{project}/zones/{z}" for z in zones],
            "quotas": [
                {"metric": m, "limit": self._limit(region, m), "usage": usage.get(m, 0.0)}
                for m in metrics
            ],
        }

    def _limit(self, region: str, metric: str) -> float:
        default = 64.0 if metric == "CPUS" else self.default_region_quota
        return float(self.region_quotas.get(region, {}).get(metric, default))

    def _live(self) -> list[FakeInstance]:
        return [i for i in self.instances.values() if i.status != "TERMINATED"]

    @staticmethod
    def _gpus(inst: FakeInstance) -> tuple[str, int]:
        machine = inst.body.get("machineType", "").rsplit("/", 1)[-1]
        if fixed := fixed_gpus(machine):
            return fixed
        accels = inst.body.get("guestAccelerators") or []
        if not accels:
            return "", 0
        gpu = accels[0].get("acceleratorType", "").rsplit("/", 1)[-1]
        return gpu, sum(int(a.get("acceleratorCount", 0)) for a in accels)
