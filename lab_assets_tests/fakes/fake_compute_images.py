"""The fake Compute Engine's images and disks (``images.*``, ``disks.*``).

Split out of ``fake_compute`` as a mixin of ``FakeCompute``: the image pipeline
(build VM -> disk -> export -> ``images.insert``) is its own corner of the API.
An image made from a disk refuses a disk still in use by a RUNNING instance, as
GCE does; a disk made from an image holds a marker of that image as its bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from lab_assets_tests.fakes.fake_compute_wire import API, ApiError, ids, now_rfc3339

if TYPE_CHECKING:
    from lab_assets_tests.fakes.fake_metadata import FakeInstance


class ImagesAndDisks:
    """`FakeCompute`'s image and disk routes; expects its `images`, `disks`, `instances`."""

    images: dict[tuple[str, str], dict]
    disks: dict[tuple[str, str, str], dict]
    instances: dict[tuple[str, str, str], FakeInstance]

    _record_op: Callable[..., dict]  # FakeCompute's

    def _images(self, method: str, m: re.Match, body: dict) -> tuple[int, dict]:
        project, fam_kw, family, name = m.groups()
        if fam_kw:
            live = [
                i
                for (p, _), i in self.images.items()
                if p == project and i.get("family") == family and i.get("status") == "READY"
            ]
            if not live:
                raise ApiError(
                    404,
                    "notFound",
                    f"The resource 'projects/{project}/global/images/family/{family}' was not found",
                )
            return 200, max(live, key=lambda i: i["creationTimestamp"])
        if name is None and method == "POST":
            iname = body.get("name", "")
            if (project, iname) in self.images:
                raise ApiError(409, "alreadyExists", f"image {iname} already exists")
            if src := body.get("sourceDisk"):
                dm = re.search(r"projects/([^/]+)/zones/([^/]+)/disks/([^/]+)$", src)
                disk = self.disks.get(dm.groups()) if dm else None
                if disk is None:
                    raise ApiError(404, "notFound", f"The resource '{src}' was not found")
                users = [self._by_link(u) for u in disk.get("users", [])]
                if any(
                    u is not None and u.status == "RUNNING" for u in users
                ) and "forceCreate=true" not in str(body):
                    raise ApiError(
                        400,
                        "resourceInUseByAnotherResource",
                        f"The disk resource '{src}' is already being used; stop the instance",
                    )
            elif not (body.get("rawDisk") or {}).get("source"):
                raise ApiError(400, "required", "Required field 'sourceDisk' or 'rawDisk' not set")
            image = {
                **body,
                "kind": "compute#image",
                "id": str(next(ids)),
                "status": "READY",
                "creationTimestamp": now_rfc3339(),
                "selfLink": f"{API}/projects/{project}/global/images/{iname}",
                "diskSizeGb": str(body.get("diskSizeGb") or 10),
            }
            self.images[(project, iname)] = image
            return 200, self._record_op(
                project, None, "insert", image, target_link=image["selfLink"]
            )
        image = self.images.get((project, name or ""))
        if image is None:
            raise ApiError(
                404,
                "notFound",
                f"The resource 'projects/{project}/global/images/{name}' was not found",
            )
        if method == "GET":
            return 200, image
        if method == "DELETE":
            del self.images[(project, name)]
            return 200, self._record_op(
                project, None, "delete", image, target_link=image["selfLink"]
            )
        raise ApiError(405, "badRequest", f"{method} not supported on images")

    def _by_link(self, link: str) -> FakeInstance | None:
        m = re.search(r"projects/([^/]+)/zones/([^/]+)/instances/([^/]+)$", link)
        return self.instances.get(m.groups()) if m else None

    def _disks(self, method: str, m: re.Match, body: dict) -> tuple[int, dict]:
        project, zone, name = m.groups()
        if name is None and method == "POST":
            dname = body["name"]
            link = f"{API}/projects/{project}/zones/{zone}/disks/{dname}"
            disk = {**body, "kind": "compute#disk", "id": str(next(ids)), "selfLink": link}
            disk["status"] = "READY"
            # A disk made from an image holds that image's bytes (a marker, here).
            disk["_content"] = f"disk from {body.get('sourceImage', 'blank')}\n".encode().ljust(
                8192, b"\0"
            )
            self.disks[(project, zone, dname)] = disk
            return 200, self._record_op(project, zone, "insert", disk, target_link=link)
        disk = self.disks.get((project, zone, name or ""))
        if disk is None:
            raise ApiError(404, "notFound", f"disk {name} not found")
        if method == "GET":
            return 200, {k: v for k, v in disk.items() if not k.startswith("_")}
        if method == "DELETE":
            del self.disks[(project, zone, name)]
            return 200, self._record_op(project, zone, "delete", disk, target_link=disk["selfLink"])
        raise ApiError(405, "badRequest", f"{method} not supported on disks")
