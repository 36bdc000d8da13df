"""A thin wrapper over google-cloud-compute: the calls the lab makes, waited on, errors sorted.

Both of the API's ways of saying "no capacity here" (an HTTP error on insert, or
an operation that finishes with ``error.errors[].code``) become ``CapacityError``
(see ``errors``). Importing this module costs ~1.5 s (google-cloud-compute), so
the launcher and the step worker import it only when a VM is to be touched.

``LAB_GCE_API_ENDPOINT`` (or ``endpoint=``) points the clients at another server,
e.g. the fake Compute Engine in the tests; an ``http://`` endpoint is used with
anonymous credentials. The transport is REST (the only one compute_v1 has).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import compute_v1

from resources.compute.gce.errors import CapacityError, GceApiError
from resources.compute.gce.errors import is_capacity as _is_capacity

ENDPOINT_ENV = "LAB_GCE_API_ENDPOINT"


def _from_http(e: gexc.GoogleAPICallError, zone: str | None, what: str) -> GceApiError:
    reasons = [
        str(d.get("reason", "")) for d in (getattr(e, "errors", None) or []) if isinstance(d, dict)
    ]
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

    # -- operations -----------------------------------------------------------------------

    def _wait(self, op: compute_v1.Operation, zone: str | None, what: str) -> compute_v1.Operation:
        deadline = time.monotonic() + self.op_timeout_s
        done = compute_v1.Operation.Status.DONE
        while op.status != done:
            if time.monotonic() > deadline:
                raise GceApiError(f"{what}: operation {op.name} still not done", "TIMEOUT", zone)
            try:
                if zone:
                    op = self.zone_ops.wait(project=self.project, zone=zone, operation=op.name)
                else:
                    op = self.global_ops.wait(project=self.project, operation=op.name)
            except gexc.GoogleAPICallError as e:
                raise _from_http(e, zone, what) from e
        if op.error and op.error.errors:
            errs = list(op.error.errors)
            code = errs[0].code
            msg = f"{what}: " + "; ".join(f"{x.code}: {x.message}" for x in errs)
            if any(_is_capacity(x.code, x.message) for x in errs):
                raise CapacityError(msg, code, zone)
            raise GceApiError(msg, code, zone)
        return op

    # -- instances ------------------------------------------------------------------------

    def insert_instance(self, zone: str, instance: compute_v1.Instance) -> compute_v1.Operation:
        what = f"instances.insert {instance.name} in {zone}"
        try:
            op = self.instances.insert_unary(
                project=self.project, zone=zone, instance_resource=instance
            )
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, what) from e
        return self._wait(op, zone, what)

    def get_instance(self, zone: str, name: str) -> compute_v1.Instance | None:
        try:
            return self.instances.get(project=self.project, zone=zone, instance=name)
        except gexc.NotFound:
            return None
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, f"instances.get {name}") from e

    def delete_instance(self, zone: str, name: str, wait: bool = True) -> bool:
        """Delete; False when it was already gone."""
        what = f"instances.delete {name} in {zone}"
        try:
            op = self.instances.delete_unary(project=self.project, zone=zone, instance=name)
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, what) from e
        if wait:
            self._wait(op, zone, what)
        return True

    def stop_instance(self, zone: str, name: str) -> None:
        what = f"instances.stop {name} in {zone}"
        try:
            op = self.instances.stop_unary(project=self.project, zone=zone, instance=name)
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, what) from e
        self._wait(op, zone, what)

    def list_instances(self, labels: dict[str, str]) -> Iterator[tuple[str, compute_v1.Instance]]:
        """(zone, instance) for every instance in the project carrying all of `labels`."""
        flt = " AND ".join(f'labels.{k} = "{v}"' for k, v in sorted(labels.items()))
        req = compute_v1.AggregatedListInstancesRequest(project=self.project, filter=flt)
        try:
            for scope, scoped in self.instances.aggregated_list(request=req):
                for inst in scoped.instances:
                    yield scope.rsplit("/", 1)[-1], inst
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, None, "instances.aggregatedList") from e

    def was_preempted(self, zone: str, name: str) -> bool:
        """Whether the zone's operations record a `compute.instances.preempted` for `name`."""
        req = compute_v1.ListZoneOperationsRequest(
            project=self.project,
            zone=zone,
            filter='operationType = "compute.instances.preempted"',
        )
        try:
            return any(
                op.target_link.rsplit("/", 1)[-1] == name for op in self.zone_ops.list(request=req)
            )
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, "zoneOperations.list") from e

    # -- images and disks -----------------------------------------------------------------

    def image_from_family(self, project: str, family: str) -> compute_v1.Image | None:
        try:
            return self.images.get_from_family(project=project, family=family)
        except gexc.NotFound:
            return None
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, None, f"images.getFromFamily {project}/{family}") from e

    def insert_image(self, image: compute_v1.Image) -> None:
        what = f"images.insert {image.name}"
        try:
            op = self.images.insert_unary(project=self.project, image_resource=image)
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, None, what) from e
        self._wait(op, None, what)

    def delete_image(self, name: str) -> bool:
        what = f"images.delete {name}"
        try:
            op = self.images.delete_unary(project=self.project, image=name)
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, None, what) from e
        self._wait(op, None, what)
        return True

    def insert_disk(self, zone: str, disk: compute_v1.Disk) -> None:
        what = f"disks.insert {disk.name} in {zone}"
        try:
            op = self.disks.insert_unary(project=self.project, zone=zone, disk_resource=disk)
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, what) from e
        self._wait(op, zone, what)

    def delete_disk(self, zone: str, name: str) -> bool:
        what = f"disks.delete {name} in {zone}"
        try:
            op = self.disks.delete_unary(project=self.project, zone=zone, disk=name)
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as e:
            raise _from_http(e, zone, what) from e
        self._wait(op, zone, what)
        return True
