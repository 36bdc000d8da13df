"""The orchestrator's lease: a heartbeat object in GCS that says "someone is launching here".

A warm VM stays up for the next step only while an orchestrator is alive to hand it
one; the Dagster run status cannot say so (a killed ``lab`` leaves its runs STARTED).
So every process that launches steps keeps one small object,
``<staging>/_gce/leases/<host>-<pid>-<random>.json`` holding ``{"t": <time>}``,
rewritten by a thread every quarter of ``lease_ttl_s`` while any launch of that
process runs. It is live while its ``t`` is younger than ``lease_ttl_s``: a few
queued runs launched one after another keep it alive in between; a SIGKILL stops
it, and after ``lease_ttl_s`` the VMs of that orchestrator delete themselves
(``resources.remote.agent_warm``). Leases stale for an hour are deleted by the next
process that takes one.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from resources.compute.gce import objects
from resources.compute.gce.gcs import Gcs
from resources.remote.protocol import LEASES_DIR

_FORGET_S = 3600  # a VM lists the leases at every heartbeat: keep the list short


def lease_dir(staging: str) -> str:
    return f"{staging.rstrip('/')}/{LEASES_DIR}"


class Lease:
    """This process's lease on one staging root; `hold()` it while launching."""

    def __init__(self, gcs: Gcs, staging: str, ttl_s: float):
        self.gcs, self.staging, self.ttl_s = gcs, staging, ttl_s
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40]
        self.id = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.uri = f"{lease_dir(staging)}/{self.id}.json"
        self._holders = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.gcs.write_json(self.uri, {"t": time.time(), "pid": os.getpid(), "ttl_s": self.ttl_s})

    def _run(self) -> None:
        every = max(0.2, self.ttl_s / 4)
        while not self._stop.wait(every):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - the next beat may pass; a VM waits ttl_s
                pass

    @contextlib.contextmanager
    def hold(self) -> Iterator[Lease]:
        with self._lock:
            self._holders += 1
            if self._holders == 1:
                self.beat()
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
        try:
            yield self
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._stop.set()  # the object stays: live for ttl_s more (queued runs)


_leases: dict[tuple[str, float], Lease] = {}
_leases_lock = threading.Lock()


def lease_for(gcs: Gcs, staging: str, ttl_s: float) -> Lease:
    """The one lease of this process on `staging` (made, and old leases swept, the first time)."""
    with _leases_lock:
        lease = _leases.get((staging, ttl_s))
        if lease is None:
            lease = _leases[(staging, ttl_s)] = Lease(gcs, staging, ttl_s)
            forget_stale(gcs, staging, _FORGET_S)
        return lease


def live_leases(gcs: Gcs, staging: str, ttl_s: float, now: float | None = None) -> set[str]:
    """Ids of the leases on `staging` younger than `ttl_s`."""
    now = now or time.time()
    out = set()
    for uri in gcs.list(lease_dir(staging)):
        body = gcs.read_json(uri) or {}
        if now - float(body.get("t", 0)) < ttl_s:
            out.add(uri.rsplit("/", 1)[-1].removesuffix(".json"))
    return out


def is_live(gcs: Gcs, staging: str, lease_id: str, ttl_s: float, now: float | None = None) -> bool:
    body = gcs.read_json(f"{lease_dir(staging)}/{lease_id}.json") or {}
    return (now or time.time()) - float(body.get("t", 0)) < ttl_s


def forget_stale(gcs: Gcs, staging: str, older_than_s: float) -> int:
    """Delete leases stale for longer than `older_than_s`; never raises."""
    n = 0
    try:
        now = time.time()
        for uri in gcs.list(lease_dir(staging)):
            body = gcs.read_json(uri) or {}
            if now - float(body.get("t", 0)) > older_than_s:
                n += objects.delete(gcs, uri)
    except Exception:  # noqa: BLE001 - housekeeping only
        pass
    return n
