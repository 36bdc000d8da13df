"""A thin wrapper over google-cloud-compute: the calls the lab makes, waited on, errors sorted.

Both of the API's ways of saying "no capacity here" (an HTTP error on insert, or
an operation that finishes with ``error.errors[].code``) become ``CapacityError``
(see ``errors``). Importing this module costs ~1.5 s (google-cloud-compute), so
the launcher and the step worker import it only when a VM is to be touched.

Every call is retried with exponential back-off and jitter on what passes: 429,
500, 502, 503, 504, a ``rateLimitExceeded`` / ``backendError`` reason, a dropped
connection (google-cloud-compute retries none of its insert, delete or operation
waits by default). Capacity and quota errors are never retried here: the zone
failover moves on instead. ``LAB_GCE_API_RETRY_S`` (default 120) bounds how long
one call keeps trying; the client library's own retries (some GETs have them) are
turned off, so this is the one policy. An insert retried after a blip that had in fact gone
through answers 409 ``alreadyExists``: that counts as created.

``LAB_GCE_API_ENDPOINT`` (or ``endpoint=``) points the clients at another server,
e.g. the fake Compute Engine in the tests; an ``http://`` endpoint is used with
anonymous credentials. The transport is REST (the only one compute_v1 has).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
from google.api_core import exceptions as gexc
from google.cloud import compute_v1

from resources.compute.gce.errors import CapacityError, GceApiError
from resources.compute.gce.errors import is_capacity as _is_capacity

ENDPOINT_ENV = "LAB_GCE_API_ENDPOINT"
RETRY_ENV = "LAB_GCE_API_RETRY_S"
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
TRANSIENT_REASONS = frozenset(
    {"rateLimitExceeded", "userRateLimitExceeded", "backendError", "internalError"}
)
log = logging.getLogger(__name__)
T = TypeVar("T")


def _reasons(e: gexc.GoogleAPICallError) -> list[str]:
    return [
        str(d.get("reason", "")) for d in (getattr(e, "errors", None) or []) if isinstance(d, dict)
    ]


def is_transient(e: BaseException) -> bool:
    """Whether `e` is a passing failure worth retrying (never a capacity or quota refusal)."""
    if isinstance(e, gexc.GoogleAPICallError):
        reasons = _reasons(e)
        msg = e.message or ""
        if any(_is_capacity(r, msg) for r in reasons) or _is_capacity(
            str(getattr(e, "reason", "") or ""), msg
        ):
            return False
        return e.code in TRANSIENT_STATUS or any(r in TRANSIENT_REASONS for r in reasons)
    return isinstance(
        e, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError
    )


def _retry_s() -> float:
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, "120")))
    except ValueError:
        return 120.0


def _from_http(e: gexc.GoogleAPICallError, zone: str | None, what: str) -> GceApiError:
    reasons = _reasons(e)
    code = next((r for r in reasons if r), getattr(e, "reason", None) or str(e.code or ""))
    msg = f"{what}: {e.message}"
    if any(_is_capacity(r, e.message or "") for r in reasons) or _is_capacity(
        code, e.message or ""
    ):
        return CapacityError(msg, code, zone)
    return GceApiError(msg, code, zone)


@dataclass
class ComputeApi:
    """One project's Compute API, with operations waited on until DONE."""

    project: str
    endpoint: str | None = None
    op_timeout_s: float = 600.0
    retry_s: float = field(default_factory=_retry_s)  # how long one call retries blips
    retries: int = 0  # transient failures retried so far (for tests and logs)

    def __post_init__(self) -> None:
        endpoint = self.endpoint or os.environ.get(ENDPOINT_ENV) or None
        kwargs: dict[str, Any] = {}
        if endpoint:
            kwargs["client_options"] = {"api_endpoint": endpoint}
            if endpoint.startswith("http://"):
                from google.auth.credentials import AnonymousCredentials

                kwargs["credentials"] = AnonymousCredentials()
        self.endpoint = endpoint
        self.instances = compute_v1.InstancesClient(**kwargs)
        self.zone_ops = compute_v1.ZoneOperationsClient(**kwargs)
        self.global_ops = compute_v1.GlobalOperationsClient(**kwargs)
        self.images = compute_v1.ImagesClient(**kwargs)
        self.disks = compute_v1.DisksClient(**kwargs)

    # -- retries --------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """`fn()`, retried with exponential back-off and jitter while its failures are transient
        (see ``is_transient``), for at most ``retry_s`` seconds; other errors as they come."""
        deadline = time.monotonic() + self.retry_s
        delay = min(1.0, max(self.retry_s / 10, 0.01))
        while True:
            try:
                return fn()
            except Exception as e:
                if not is_transient(e) or time.monotonic() + delay > deadline:
                    raise
                self.retries += 1
                log.warning("%s: %s; retrying in %.1fs", what, e, delay)
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 30.0)

    def _api(self, fn: Callable[[], T], what: str, zone: str | None) -> T:
        """`_call`, with an HTTP error that outlived the retries sorted into a GceApiError."""
        try:
            return self._call(fn, what)
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, what) from e
        except requests.exceptions.RequestException as e:
            raise GceApiError(f"{what}: {e}", "CONNECTION", zone) from e

    # -- operations -----------------------------------------------------------------------

    def _wait(self, op: compute_v1.Operation, zone: str | None, what: str) -> compute_v1.Operation:
        deadline = time.monotonic() + self.op_timeout_s
        done = compute_v1.Operation.Status.DONE
        while op.status != done:
            if time.monotonic() > deadline:
                raise GceApiError(f"{what}: operation {op.name} still not done", "TIMEOUT", zone)
            name = op.name
            if zone:
                op = self._api(
                    lambda n=name: self.zone_ops.wait(
                        project=self.project, zone=zone, operation=n, retry=None
                    ),
                    f"{what}: zoneOperations.wait",
                    zone,
                )
            else:
                op = self._api(
                    lambda n=name: self.global_ops.wait(
                        project=self.project, operation=n, retry=None
                    ),
                    f"{what}: globalOperations.wait",
                    zone,
                )
        if op.error and op.error.errors:
            errs = list(op.error.errors)
            code = errs[0].code
            msg = f"{what}: " + "; ".join(f"{x.code}: {x.message}" for x in errs)
            if any(_is_capacity(x.code, x.message) for x in errs):
                raise CapacityError(msg, code, zone)
            raise GceApiError(msg, code, zone)
        return op

    # -- instances ------------------------------------------------------------------------

    def insert_instance(
        self, zone: str, instance: compute_v1.Instance
    ) -> compute_v1.Operation | None:
        """Create the instance and wait for it. A failure after GCE accepted the insert
        (its operation could not be followed to the end) is a GceApiError with
        ``accepted`` set: the VM may exist, and the caller must delete it."""
        what = f"instances.insert {instance.name} in {zone}"
        tries = 0

        def insert() -> compute_v1.Operation | None:
            nonlocal tries
            tries += 1
            try:
                return self.instances.insert_unary(
                    project=self.project, zone=zone, instance_resource=instance, retry=None
                )
            except gexc.Conflict:
                if tries > 1:  # an earlier try went through before its answer was lost
                    return None
                raise

        op = self._api(insert, what, zone)
        if op is None:
            log.warning("%s: created by an earlier try (409 alreadyExists on retry)", what)
            return None
        try:
            return self._wait(op, zone, what)
        except CapacityError:
            raise  # the operation ended in a stockout: GCE created nothing
        except GceApiError as e:
            e.accepted = True
            raise

    def get_instance(self, zone: str, name: str) -> compute_v1.Instance | None:
        what = f"instances.get {name}"
        try:
            return self._call(
                lambda: self.instances.get(
                    project=self.project, zone=zone, instance=name, retry=None
                ),
                what,
            )
        except gexc.NotFound:
            return None
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, what) from e
        except requests.exceptions.RequestException as e:
            raise GceApiError(f"{what}: {e}", "CONNECTION", zone) from e

    def delete_instance(self, zone: str, name: str, wait: bool = True) -> bool:
        """Delete; False when it was already gone."""
        what = f"instances.delete {name} in {zone}"
        try:
            op = self._call(
                lambda: self.instances.delete_unary(
                    project=self.project, zone=zone, instance=name, retry=None
                ),
                what,
            )
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, what) from e
        except requests.exceptions.RequestException as e:
            raise GceApiError(f"{what}: {e}", "CONNECTION", zone) from e
        if wait:
            self._wait(op, zone, what)
        return True

    def stop_instance(self, zone: str, name: str) -> None:
        what = f"instances.stop {name} in {zone}"
        op = self._api(
            lambda: self.instances.stop_unary(
                project=self.project, zone=zone, instance=name, retry=None
            ),
            what,
            zone,
        )
        self._wait(op, zone, what)

    def list_instances(self, labels: dict[str, str]) -> Iterator[tuple[str, compute_v1.Instance]]:
        """(zone, instance) for every instance in the project carrying all of `labels`."""
        flt = " AND ".join(f'labels.{k} = "{v}"' for k, v in sorted(labels.items()))
        req = compute_v1.AggregatedListInstancesRequest(project=self.project, filter=flt)
        pages = self._api(
            lambda: list(self.instances.aggregated_list(request=req, retry=None)),
            "instances.aggregatedList",
            None,
        )
        for scope, scoped in pages:
            for inst in scoped.instances:
                yield scope.rsplit("/", 1)[-1], inst

    def was_preempted(self, zone: str, name: str) -> bool:
        """Whether the zone's operations record a `compute.instances.preempted` for `name`."""
        req = compute_v1.ListZoneOperationsRequest(
            project=self.project,
            zone=zone,
            filter='operationType = "compute.instances.preempted"',
        )
        ops = self._api(
            lambda: list(self.zone_ops.list(request=req, retry=None)), "zoneOperations.list", zone
        )
        return any(op.target_link.rsplit("/", 1)[-1] == name for op in ops)

    # -- images and disks -----------------------------------------------------------------

    def image_from_family(self, project: str, family: str) -> compute_v1.Image | None:
        what = f"images.getFromFamily {project}/{family}"
        try:
            return self._call(
                lambda: self.images.get_from_family(project=project, family=family, retry=None),
                what,
            )
        except gexc.NotFound:
            return None
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, None, what) from e

    def insert_image(self, image: compute_v1.Image) -> None:
        what = f"images.insert {image.name}"
        op = self._api(
            lambda: self.images.insert_unary(
                project=self.project, image_resource=image, retry=None
            ),
            what,
            None,
        )
        self._wait(op, None, what)

    def delete_image(self, name: str) -> bool:
        what = f"images.delete {name}"
        try:
            op = self._call(
                lambda: self.images.delete_unary(project=self.project, image=name, retry=None), what
            )
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, None, what) from e
        self._wait(op, None, what)
        return True

    def insert_disk(self, zone: str, disk: compute_v1.Disk) -> None:
        what = f"disks.insert {disk.name} in {zone}"
        op = self._api(
            lambda: self.disks.insert_unary(
                project=self.project, zone=zone, disk_resource=disk, retry=None
            ),
            what,
            zone,
        )
        self._wait(op, zone, what)

    def delete_disk(self, zone: str, name: str) -> bool:
        what = f"disks.delete {name} in {zone}"
        try:
            op = self._call(
                lambda: self.disks.delete_unary(
                    project=self.project, zone=zone, disk=name, retry=None
                ),
                what,
            )
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, what) from e
        self._wait(op, zone, what)
        return True

    # -- long operations, projects and regions (preflight, image builds) ------------------

    def _extra_client(self, cls: type[T]) -> T:
        """A client of another Compute resource, with the same endpoint and credentials."""
        kwargs: dict[str, Any] = {}
        if self.endpoint:
            kwargs["client_options"] = {"api_endpoint": self.endpoint}
            if self.endpoint.startswith("http://"):
                from google.auth.credentials import AnonymousCredentials

                kwargs["credentials"] = AnonymousCredentials()
        return cls(**kwargs)

    def wait_global_long(
        self,
        op: compute_v1.Operation,
        what: str,
        timeout_s: float,
        poll_s: float = 10.0,
        progress: Callable[[str], None] | None = None,
        progress_every_s: float = 60.0,
    ) -> compute_v1.Operation:
        """Wait for a long global operation (``images.insert`` from a 100 GB disk takes
        minutes) with its own deadline, not ``op_timeout_s``, polling ``globalOperations.get``
        every `poll_s` and reporting its progress through `progress` when it changes and
        at least every `progress_every_s`. Past the deadline: a GceApiError ``TIMEOUT``
        saying the operation may still finish and how to look at it."""
        start = time.monotonic()
        deadline = start + timeout_s
        last_said, last_pct = start, -1
        done = compute_v1.Operation.Status.DONE
        while op.status != done:
            now = time.monotonic()
            if now > deadline:
                raise GceApiError(
                    f"{what}: operation {op.name} not done after {timeout_s:.0f}s; it may "
                    f"still finish: gcloud compute operations describe {op.name} --global "
                    f"--project {self.project}",
                    "TIMEOUT",
                    None,
                )
            if progress is not None and (
                op.progress != last_pct or now - last_said >= progress_every_s
            ):
                progress(
                    f"{what}: {op.progress}% after {now - start:.0f}s "
                    f"(waiting up to {timeout_s:.0f}s)"
                )
                last_said, last_pct = now, op.progress
            time.sleep(max(0.0, min(poll_s, deadline - now)))
            name = op.name
            op = self._api(
                lambda n=name: self.global_ops.get(project=self.project, operation=n, retry=None),
                f"{what}: globalOperations.get",
                None,
            )
        return self._wait(op, None, what)  # DONE: sorts its error, if any

    def insert_image_long(
        self,
        image: compute_v1.Image,
        timeout_s: float,
        poll_s: float = 10.0,
        progress: Callable[[str], None] | None = None,
        progress_every_s: float = 60.0,
    ) -> None:
        """``images.insert``, waited on with its own deadline (see ``wait_global_long``)."""
        what = f"images.insert {image.name}"
        op = self._api(
            lambda: self.images.insert_unary(
                project=self.project, image_resource=image, retry=None
            ),
            what,
            None,
        )
        self.wait_global_long(op, what, timeout_s, poll_s, progress, progress_every_s)

    def get_project(self) -> compute_v1.Project:
        """``projects.get``: the project's global quotas (GPUS_ALL_REGIONS, ...) and its
        default service account."""
        client = self._extra_client(compute_v1.ProjectsClient)
        return self._api(
            lambda: client.get(project=self.project, retry=None),
            f"projects.get {self.project}",
            None,
        )

    def get_region(self, region: str) -> compute_v1.Region:
        """``regions.get``: the region's quotas (NVIDIA_L4_GPUS, PREEMPTIBLE_NVIDIA_L4_GPUS, ...)."""
        client = self._extra_client(compute_v1.RegionsClient)
        return self._api(
            lambda: client.get(project=self.project, region=region, retry=None),
            f"regions.get {region}",
            None,
        )

    # -- the serial console (what a VM that never reported printed) -----------------------

    def serial_port_output(self, zone: str, name: str, start: int = 0, port: int = 1) -> str:
        """``instances.getSerialPortOutput``: the console's text from byte `start` (< 0: that
        many bytes back from the end; GCE keeps the last 1 MiB)."""
        what = f"instances.getSerialPortOutput {name}"
        req = compute_v1.GetSerialPortOutputInstanceRequest(
            project=self.project, zone=zone, instance=name, port=port, start=start
        )
        out = self._api(
            lambda: self.instances.get_serial_port_output(request=req, retry=None), what, zone
        )
        return out.contents or ""
