"""The fake Compute Engine's request checks and injected faults: refuse what GCE refuses.

A fake that accepts any machine type, accelerator, zone, GPU count or image lets
the launcher pass tests with bodies the real API answers with 400. The checks
here come from the same catalog the launcher prices from
(``resources.compute.gce.catalog``): an unknown zone, a machine type or GPU the
zone does not offer, a GPU count other than the machine type's own (A2/A3/G2
carry a fixed count: ``g2-standard-24`` has two L4s), GPUs on a machine type that
takes none, an image that does not exist, and a network or subnetwork the project
does not have (``FakeCompute.networks`` / ``subnetworks``; the ``default`` network
only, unless a test adds more) are ``400 invalid``, worded as GCE words them.

``Faults`` makes the API fail transiently on purpose: ``fail_next("instances.insert",
2, status=503)`` fails the next two inserts with 503 ``backendError``; with
``after=True`` the call is carried out first and only its answer is lost (a retried
insert then meets 409 ``alreadyExists``, as on GCE).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from lab_assets_tests.fakes.fake_compute_wire import API, ApiError
from resources.compute.gce.catalog import CPU_ONLY, default_catalog, fixed_gpus
from resources.compute.gce.vm_spec import DLVM_FAMILY, DLVM_PROJECT

# Public images the fake knows besides those created through it.
PUBLIC_IMAGES = frozenset({f"projects/{DLVM_PROJECT}/global/images/family/{DLVM_FAMILY}"})
# Machine types that take GPUs attached by count (N1), with the counts GCE allows.
ATTACHABLE_COUNTS = (1, 2, 4, 8)


def _invalid(field: str, value: str, why: str) -> ApiError:
    return ApiError(400, "invalid", f"Invalid value for field '{field}': '{value}'. {why}")


def _last(link: str) -> str:
    return link.rstrip("/").rsplit("/", 1)[-1]


def check_insert(
    zone: str,
    body: dict,
    images: dict[tuple[str, str], dict],
    networks: frozenset[str] = frozenset({"default"}),
    subnetworks: frozenset[str] = frozenset(),
) -> None:
    """Raise the ApiError GCE would answer `instances.insert` in `zone` with `body`, if any."""
    cat = default_catalog()
    if zone not in cat.zones:
        raise ApiError(400, "invalid", f"Invalid value for field 'zone': '{zone}'. Unknown zone.")
    mt_link = body.get("machineType", "")
    machine = _last(mt_link)
    if machine not in cat.machine_types() or cat.offers(machine, zone) is False:
        raise _invalid(
            "resource.machineType",
            mt_link,
            f"Machine type with name '{machine}' does not exist in zone '{zone}'.",
        )
    accels = body.get("guestAccelerators") or []
    for i, acc in enumerate(accels):
        a_link = acc.get("acceleratorType", "")
        gpu = _last(a_link)
        zones = {z for g, z in cat.gpus if g == gpu}
        if gpu not in cat.gpu_types() or (zones and zone not in zones):
            raise _invalid(
                f"resource.guestAccelerators[{i}].acceleratorType",
                a_link,
                f"Accelerator type '{gpu}' does not exist in zone '{zone}'.",
            )
    fixed = fixed_gpus(machine)
    asked = [
        (_last(a.get("acceleratorType", "")), int(a.get("acceleratorCount", 0))) for a in accels
    ]
    if fixed is not None:
        if asked and asked != [fixed]:
            raise ApiError(
                400,
                "invalid",
                f"Machine type {machine} comes with {fixed[1]} {fixed[0]} GPU(s); the request "
                f"asks for {', '.join(f'{n} {g}' for g, n in asked)}.",
            )
    elif asked and (machine in CPU_ONLY or not machine.startswith("n1-")):
        raise ApiError(400, "invalid", f"Machine type {machine} does not support accelerators.")
    elif any(n not in ATTACHABLE_COUNTS for _, n in asked):
        raise ApiError(400, "invalid", f"Invalid accelerator count {asked} for {machine}.")
    for i, nic in enumerate(body.get("networkInterfaces") or []):
        for key, known in (("network", networks), ("subnetwork", subnetworks)):
            link = nic.get(key)
            if link and _last(link) not in known:
                raise _invalid(
                    f"resource.networkInterfaces[{i}].{key}",
                    link,
                    f"The referenced {key} resource cannot be found.",
                )
    for i, disk in enumerate(body.get("disks") or []):
        src = (disk.get("initializeParams") or {}).get("sourceImage")
        if src and not _image_exists(src, images):
            raise _invalid(
                f"resource.disks[{i}].initializeParams.sourceImage",
                src,
                "The referenced image resource cannot be found.",
            )


def _image_exists(src: str, images: dict[tuple[str, str], dict]) -> bool:
    rel = src.removeprefix(f"{API}/").removeprefix("https://compute.googleapis.com/compute/v1/")
    if rel in PUBLIC_IMAGES:
        return True
    m = re.fullmatch(r"projects/([^/]+)/global/images/(?:family/([^/]+)|([^/]+))", rel)
    if not m:
        return False
    project, family, name = m.groups()
    if name:
        return (project, name) in images
    return any(
        p == project and i.get("family") == family and i.get("status") == "READY"
        for (p, _), i in images.items()
    )


@dataclass
class Fault:
    left: int
    status: int
    reason: str
    after: bool  # carry the call out, then lose its answer


class Faults:
    """Transient failures to inject, per API method name (``instances.insert``,
    ``instances.get``, ``instances.delete``, ``zoneOperations.wait``, ...)."""

    MESSAGES = {
        429: "Rate Limit Exceeded",
        403: "Rate Limit Exceeded",
        500: "Internal error. Please try again or contact Google Support.",
        502: "Bad Gateway",
        503: "The service is currently unavailable.",
        504: "Deadline exceeded",
    }

    def __init__(self) -> None:
        self._faults: dict[str, Fault] = {}
        self._lock = threading.Lock()
        self.injected: list[str] = []  # method names of every failure served

    def fail_next(
        self, method: str, n: int = 1, status: int = 503, reason: str = "", after: bool = False
    ) -> None:
        reason = reason or {429: "rateLimitExceeded", 403: "rateLimitExceeded"}.get(
            status, "backendError"
        )
        with self._lock:
            self._faults[method] = Fault(n, status, reason, after)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, method: str) -> Fault | None:
        """The fault for this call of `method`, if one is pending (counted down)."""
        with self._lock:
            f = self._faults.get(method)
            if f is None or f.left <= 0:
                return None
            f.left -= 1
            if f.left <= 0:
                del self._faults[method]
            self.injected.append(method)
            return f

    def error(self, f: Fault) -> ApiError:
        return ApiError(f.status, f.reason, self.MESSAGES.get(f.status, "transient error"))


def method_name(method: str, path: str) -> str:
    """The API method a request calls, e.g. ``instances.insert``, ``zoneOperations.wait``."""
    parts = path.split("/compute/v1/projects/", 1)[-1].split("/")[1:]  # after the project
    if not parts:  # the project itself
        return "projects.get"
    if parts[:1] == ["aggregated"]:
        return "instances.aggregatedList"
    if parts[:1] == ["zones"] and len(parts) >= 3:
        parts = parts[2:]
    elif parts[:1] == ["global"]:
        parts = parts[1:]
    kind = parts[0] if parts else ""
    if kind == "operations":
        prefix = "zoneOperations" if "/zones/" in path else "globalOperations"
        if len(parts) == 1:
            return f"{prefix}.list"
        return f"{prefix}.{'wait' if parts[-1] == 'wait' else 'get'}"
    if len(parts) == 1:
        return f"{kind}.{'insert' if method == 'POST' else 'list'}"
    if len(parts) >= 3 and method == "POST":
        return f"{kind}.{parts[-1]}"
    if parts[1] == "family":
        return f"{kind}.getFromFamily"
    return f"{kind}.{ {'GET': 'get', 'DELETE': 'delete', 'POST': 'insert'}[method] }"
