"""The Compute API's errors as the lab sorts them (no google-cloud-compute import: it is slow).

The API reports a zone without capacity in two ways: an HTTP error on
``instances.insert`` (e.g. 403 ``quotaExceeded``, 503 ``resourceExhausted``), or
an accepted insert whose operation finishes with ``error.errors[].code`` such as
``ZONE_RESOURCE_POOL_EXHAUSTED``. Both become ``CapacityError``, which the zone
failover catches; anything else is a ``GceApiError`` that stops the launch.
A ``GceApiError`` with ``accepted`` set comes from an insert that GCE accepted but
whose operation could not be followed to its end: the VM may exist.
"""

from __future__ import annotations

# Operation error codes and HTTP error reasons that mean "try another zone / machine".
CAPACITY_CODES = frozenset(
    {
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
        "QUOTA_EXCEEDED",
        "RESOURCE_POOL_EXHAUSTED",
        "STOCKOUT",
        "quotaExceeded",
        "resourceExhausted",
        "RESOURCE_EXHAUSTED",
    }
)


class GceApiError(RuntimeError):
    """A Compute API call failed; `code` is the API's error code or reason."""

    def __init__(self, message: str, code: str = "", zone: str | None = None):
        super().__init__(message)
        self.code = code
        self.zone = zone
        self.accepted = False  # an insert was accepted, then its wait failed: the VM may exist


class CapacityError(GceApiError):
    """No capacity or quota for this request in this zone: another zone may have it."""


def is_capacity(code: str, message: str) -> bool:
    return code in CAPACITY_CODES or "does not have enough resources available" in message
