"""The VM's life between steps: its life record, staying warm for the next step, retiring.

Ships to the VM beside the agent (standard library and google-cloud-storage, through
the bucket object it is handed). The launcher's instructions carry a ``warm`` block
(``idle_s``, the VM's ``shape``, its ``deadline``, the lease time-to-live, the Compute
endpoint, where its cost is recorded). After each step the agent asks ``next_step``:

- ``idle_s`` > 0: while some orchestrator lease is live (``protocol.LEASES_DIR``), the
  VM offers itself under ``OFFERS_DIR/<shape>/<vm>.json`` for ``idle_s`` seconds and
  polls ``CLAIMS_DIR/<vm>/<seq>.json``. A launcher claims it by creating that object
  with ``ifGenerationMatch=0`` and the next step's instructions in it; to retire, the
  VM tries to create the same object itself. GCS lets exactly one create succeed, so
  a VM is never both handed a step and gone.
- ``idle_s`` = 0 (one VM per step, as before warm VMs): the VM waits for its launcher to
  delete it, but no longer than the lease time-to-live, and not at all once no lease is
  live (the orchestrator was killed): then it retires.

Retiring settles the VM's cost in the ledger (warm VMs outlive the step that created
them) and deletes the instance through the Compute API (``agent_compute``). Every
heartbeat rewrites ``VMS_DIR/<vm>.json`` (state, time, idle-until, deadline): the
reaper deletes a VM by those life signs, never while its agent is alive and working.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from resources.remote.protocol import (
    CLAIMS_DIR,
    LEASES_DIR,
    OFFERS_DIR,
    VM_DONE,
    VM_IDLE,
    VM_RETIRING,
    VMS_DIR,
    parse_gs_uri,
)


def _precondition_failed(e: BaseException) -> bool:
    return getattr(e, "code", None) == 412


class WarmPost:
    """One VM's records in the staging bucket, and its choice after each step."""

    def __init__(self, client: Any, warm: dict[str, Any], vm: str, log: Callable[[str], None]):
        self.warm = warm
        self.vm = vm
        self.log = log
        bucket, self.root = parse_gs_uri(warm["staging"])
        self.bucket = client.bucket(bucket)
        self.idle_s = float(warm.get("idle_s", 0))
        self.ttl_s = float(warm.get("lease_ttl_s", 120))
        self.poll_s = float(warm.get("poll_s", 2.0))
        self.heartbeat_s = float(warm.get("heartbeat_s", 15.0))
        self.deadline = float(warm.get("deadline") or 0) or None
        self.min_life_s = float(warm.get("min_life_s", 0))
        self.shape = str(warm.get("shape", ""))
        self.seq = 0
        self.steps = 0  # steps run on this VM

    # -- records ---------------------------------------------------------------------------

    def _name(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def _write(self, rel: str, body: dict[str, Any], **kw: Any) -> None:
        self.bucket.blob(self._name(rel)).upload_from_string(
            json.dumps(body), "application/json", **kw
        )

    def _read(self, rel: str) -> dict[str, Any] | None:
        blob = self.bucket.blob(self._name(rel))
        try:
            return json.loads(blob.download_as_bytes())
        except Exception as e:
            if getattr(e, "code", None) == 404:
                return None
            raise

    def _delete(self, rel: str) -> None:
        try:
            self.bucket.blob(self._name(rel)).delete()
        except Exception as e:
            if getattr(e, "code", None) != 404:
                self.log(f"could not delete {rel}: {e}")

    def beat(self, state: str, **extra: Any) -> None:
        """The VM's life record: what it does now, as of now (never raises)."""
        body = {
            "vm": self.vm,
            "state": state,
            "t": time.time(),
            "deadline": self.deadline,
            "shape": self.shape,
            "idle_s": self.idle_s,
            "steps": self.steps,
            **extra,
        }
        try:
            self._write(f"{VMS_DIR}/{self.vm}.json", body)
        except Exception as e:  # a missed beat is not fatal; a run of them makes it stale
            self.log(f"life record not written: {e}")

    def lease_live(self) -> bool:
        """Whether some orchestrator heartbeat is fresher than the lease time-to-live."""
        now = time.time()
        prefix = self._name(LEASES_DIR) + "/"
        for blob in self.bucket.client.list_blobs(self.bucket.name, prefix=prefix):
            # The listing's update time (GCS's clock) says when the lease last beat: no
            # download per lease.
            if blob.updated is not None and now - blob.updated.timestamp() < self.ttl_s:
                return True
        return False

    # -- after a step ------------------------------------------------------------------------

    def next_step(self, stop: threading.Event) -> tuple[dict[str, Any] | None, str]:
        """The next step's instructions, or (None, why the VM should go); `stop` is set when
        the VM is going anyway (preempted, or deleted: SIGTERM), and wakes every wait."""
        self.steps += 1
        if stop.is_set():
            return None, "stopped (preempted or deleted)"
        if self.idle_s <= 0:
            return None, self._wait_for_delete(stop)
        if not self.lease_live():
            return None, "no live orchestrator lease"
        now = time.time()
        if self.deadline is not None and self.deadline - now < self.min_life_s:
            return None, "too close to its maxRunDuration deadline for another step"
        return self._offer(stop)

    def _wait_for_delete(self, stop: threading.Event) -> str:
        """idle 0: the launcher deletes the VM; retire only if it does not."""
        start = time.time()
        last = 0.0
        while not stop.is_set():
            now = time.time()
            if now - last >= self.heartbeat_s:
                self.beat(VM_DONE)
                last = now
                if not self.lease_live():
                    return "no live orchestrator lease: nobody will delete it"
            if now - start > self.ttl_s:
                return f"its launcher did not delete it within {self.ttl_s:.0f}s"
            stop.wait(self.poll_s)
        return "stopped (deleted)"

    def _offer(self, stop: threading.Event) -> tuple[dict[str, Any] | None, str]:
        self.seq += 1
        offer_rel = f"{OFFERS_DIR}/{self.shape}/{self.vm}.json"
        claim_rel = f"{CLAIMS_DIR}/{self.vm}/{self.seq}.json"
        idle_until = time.time() + self.idle_s
        offer = {
            **(self.warm.get("offer") or {}),
            "vm": self.vm,
            "seq": self.seq,
            "shape": self.shape,
            "idle_until": idle_until,
            "deadline": self.deadline,
        }
        self.log(f"idle: on offer for {self.idle_s:.0f}s (shape {self.shape}, seq {self.seq})")
        last = 0.0
        why = ""
        while True:
            claim = self._read(claim_rel)
            if claim is not None:
                self._delete(offer_rel)
                if claim.get("step"):
                    self.log(
                        f"claimed by {claim.get('by', '?')} for {claim['step'].get('step_key')}"
                    )
                    return claim["step"], ""
                return None, str(claim.get("retire") or why)
            now = time.time()
            if stop.is_set():
                why = "stopped (preempted or deleted) while idle"
            elif now >= idle_until:
                why = f"idle for {self.idle_s:.0f}s with no step of its shape"
            elif now - last >= self.heartbeat_s:
                last = now
                if not self.lease_live():
                    why = "no live orchestrator lease"
                else:
                    try:
                        self._write(offer_rel, {**offer, "t": now})
                    except Exception as e:
                        self.log(f"offer not refreshed: {e}")
                    self.beat(VM_IDLE, idle_until=idle_until, seq=self.seq)
            if why:
                try:
                    self._write(claim_rel, {"retire": why, "t": now}, if_generation_match=0)
                except Exception as e:
                    if not _precondition_failed(e):
                        raise
                    continue  # a launcher claimed it first: read its step
                self._delete(offer_rel)
                return None, why
            stop.wait(self.poll_s)

    # -- the end -----------------------------------------------------------------------------

    def settle(self) -> None:
        """Record the VM's whole cost in the ledger entry its creator reserved (never raises)."""
        led = self.warm.get("ledger")
        if not led:
            return
        try:
            seconds = max(0.0, time.time() - float(led["created_at"]))
            body = {
                "state": "settled",
                "cost_usd": seconds / 3600 * float(led["hourly_usd"]),
                "vm_seconds": seconds,
                "settled_at": time.time(),
                "settled_by": "vm",
                **(led.get("facts") or {}),
            }
            bucket, name = parse_gs_uri(led["uri"])
            self.bucket.client.bucket(bucket).blob(name).upload_from_string(
                json.dumps(body), "application/json"
            )
        except Exception as e:
            self.log(f"ledger entry not settled: {e}")

    def retire(self, why: str, delete: Callable[[], str]) -> None:
        """Settle the cost, say so in the life record, and delete the instance."""
        self.log(f"retiring: {why}")
        self.beat(VM_RETIRING, why=why)
        self.settle()
        # Its claims are spent (the offer is gone, the last claim decided): clear them.
        prefix = self._name(f"{CLAIMS_DIR}/{self.vm}") + "/"
        try:
            for blob in self.bucket.client.list_blobs(self.bucket.name, prefix=prefix):
                blob.delete()
        except Exception as e:
            self.log(f"claims not cleared: {e}")
        try:
            self.log(delete())
        except Exception as e:
            self.log(f"could not delete itself ({e}); the launcher or the reaper will")
