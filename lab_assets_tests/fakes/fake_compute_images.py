"""The fake Compute Engine's images and disks (``images.*``, ``disks.*``).

Split out of ``fake_compute`` as a mixin of ``FakeCompute``: the image pipeline
(build VM -> disk -> export -> ``images.insert``) is its own corner of the API.
An image made from a disk refuses a disk still in use by a RUNNING instance, as
GCE does; a disk made from an image holds a marker of that image as its bytes.

Two things real GCE does that a fake easily forgets:

- ``images.insert`` is slow: its operation runs for ``image_insert_s`` (default 0)
  with a ``progress`` that climbs, as a 100 GB image's does for minutes.
- Every disk copied from an image carries that image's filesystem id (a block copy:
  same UUID, same label). GCE accepts a VM whose boot disk and an attached disk
  share one, but its guest may mount the wrong one as root: the fake records the
  clash in ``fs_id_clashes`` and takes the bad case (the guest never comes up: no
  agent, the reason on the serial console). Public images the fake knows
  (``PUBLIC``: the Deep Learning VM family and Debian 12) each have their own id.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lab_assets_tests.fakes.fake_compute_wire import API, ApiError, Operation, ids, now_rfc3339
from resources.compute.gce.vm_spec import DLVM_FAMILY, DLVM_PROJECT

if TYPE_CHECKING:
    from lab_assets_tests.fakes.fake_metadata import FakeInstance


# (project, image name, family) of the public images the fake serves.
PUBLIC = (
    (DLVM_PROJECT, f"{DLVM_FAMILY}-v20261101", DLVM_FAMILY),
    ("debian-cloud", "debian-12-bookworm-v20261110", "debian-12"),
)


@dataclass
class _TimedOperation(Operation):
    """An operation whose ``progress`` climbs from its start until it is DONE."""

    started: float = 0.0
    on_done: Callable[[], None] | None = None  # called (once or more) when first seen DONE

    def view(self) -> dict:
        body = super().view()
        if body.get("status") == "DONE" and self.on_done is not None:
            self.on_done()
        else:
            span = max(self.done_at - self.started, 1e-6)
            body["progress"] = int(min(99, 100 * (time.time() - self.started) / span))
        return body


def _fs_id(seed: str) -> str:
    return "fs-" + hashlib.sha256(seed.encode()).hexdigest()[:12]


class ImagesAndDisks:
    """`FakeCompute`'s image and disk routes; expects its `images`, `disks`, `instances`."""

    images: dict[tuple[str, str], dict]
    disks: dict[tuple[str, str, str], dict]
    instances: dict[tuple[str, str, str], FakeInstance]
    operations: dict[str, Operation]
    op_delay_s: float
    _tmp: object  # FakeCompute's scratch directory (a Path)

    _record_op: Callable[..., dict]  # FakeCompute's
    image_insert_s: float = 0.0  # how long an images.insert operation runs

    def _init_images(self) -> None:
        """The public images, and the filesystem ids of images and disks."""
        self.image_fs: dict[tuple[str, str], str] = {}
        self.disk_fs: dict[tuple[str, str, str], str] = {}
        self.fs_id_clashes: list[dict] = []  # VMs whose disks shared a filesystem id
        for project, name, family in PUBLIC:
            self.images[(project, name)] = {
                "kind": "compute#image",
                "id": str(next(ids)),
                "name": name,
                "family": family,
                "status": "READY",
                "diskSizeGb": "50",
                "creationTimestamp": "2026-11-01T00:00:00.000Z",
                "selfLink": f"{API}/projects/{project}/global/images/{name}",
            }
            self.image_fs[(project, name)] = _fs_id(f"{project}/{name}")

    # -- filesystem ids -------------------------------------------------------------------

    def _fs_of_image(self, link: str) -> str:
        rel = link[link.index("projects/") :] if "projects/" in link else link
        m = re.fullmatch(r"projects/([^/]+)/global/images/(?:family/([^/]+)|([^/]+))", rel)
        if not m:
            return _fs_id(rel)
        project, family, name = m.groups()
        if family:
            live = [
                (i["creationTimestamp"], n)
                for (p, n), i in self.images.items()
                if p == project and i.get("family") == family and i.get("status") == "READY"
            ]
            if not live:
                return _fs_id(rel)
            name = max(live)[1]
        return self.image_fs.get((project, name), _fs_id(f"{project}/{name}"))

    def _fs_of_disk(self, key: tuple[str, str, str]) -> str:
        if key in self.disk_fs:
            return self.disk_fs[key]
        for user in (self.disks.get(key) or {}).get("users", []):
            inst = self._by_link(user)
            for d in inst.body.get("disks", []) if inst else []:
                src = (d.get("initializeParams") or {}).get("sourceImage")
                if d.get("boot") and src:
                    return self._fs_of_image(src)
        return _fs_id("/".join(key))

    def _disk_fs_ids(self, inst: FakeInstance) -> list[tuple[str, str]]:
        """(device, filesystem id) of each of the instance's disks."""
        out = []
        for d in inst.body.get("disks", []):
            src = (d.get("initializeParams") or {}).get("sourceImage")
            if src:
                fs = self._fs_of_image(src)
            elif m := re.search(
                r"projects/([^/]+)/zones/([^/]+)/disks/([^/]+)$", d.get("source", "")
            ):
                fs = self._fs_of_disk(m.groups())
            else:
                continue
            out.append((d.get("deviceName") or ("boot" if d.get("boot") else "?"), fs))
        return out

    def _boot(self, inst: FakeInstance) -> None:
        """Boot as `VmLifecycle` does, unless two of the VM's disks share a filesystem id:
        then the guest (the bad case of a race) mounts the wrong root and never starts."""
        fs = self._disk_fs_ids(inst)
        seen: dict[str, str] = {}
        for device, fid in fs:
            if fid in seen:
                clash = {"instance": inst.name, "fs_id": fid, "disks": [seen[fid], device]}
                self.fs_id_clashes.append(clash)
                time.sleep(self.op_delay_s)
                inst.status = "RUNNING"
                serial = self._tmp / inst.name / "serial.log"  # type: ignore[operator]
                serial.parent.mkdir(parents=True, exist_ok=True)
                serial.write_text(
                    f"EXT4-fs: two disks carry filesystem {fid} ({seen[fid]}, {device}); "
                    "the root mounted may be the wrong one: the guest did not come up\n"
                )
                return
            seen[fid] = device
        super()._boot(inst)  # type: ignore[misc]

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
                fs = self._fs_of_disk(dm.groups()) if disk is not None else ""
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
            else:  # the archive's bytes are not read here: an id of its own
                fs = _fs_id(body["rawDisk"]["source"])
            image = {
                **body,
                "kind": "compute#image",
                "id": str(next(ids)),
                "status": "PENDING",  # READY once its operation is DONE
                "creationTimestamp": now_rfc3339(),
                "selfLink": f"{API}/projects/{project}/global/images/{iname}",
                "diskSizeGb": str(body.get("diskSizeGb") or 10),
            }
            self.images[(project, iname)] = image
            self.image_fs[(project, iname)] = fs
            op = self._record_op(project, None, "insert", image, target_link=image["selfLink"])
            start, delay = time.time(), max(self.op_delay_s, self.image_insert_s)

            def ready(image: dict = image) -> None:
                if image.get("status") == "PENDING":
                    image["status"] = "READY"

            self.operations[op["name"]] = _TimedOperation(
                op, start + delay, started=start, on_done=ready
            )
            timer = threading.Timer(delay, ready)
            timer.daemon = True
            timer.start()
            return 200, op
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
            self.disk_fs[(project, zone, dname)] = (
                self._fs_of_image(body["sourceImage"]) if body.get("sourceImage") else _fs_id(link)
            )
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
