"""Single GCS objects with generation preconditions: create-once, compare-and-swap, delete.

Warm-VM claims, the in-flight index and the leases need what ``gcs.Gcs`` (plain reads
and writes) does not offer: "create only if absent" (``ifGenerationMatch=0``), "replace
only if unchanged since I read it" (``ifGenerationMatch=<generation>``) and deleting
one object. GCS evaluates the precondition atomically, so when two writers race exactly
one succeeds and the other gets 412, reported here as ``False``.
"""

from __future__ import annotations

import json
from typing import Any

from google.api_core.exceptions import NotFound, PreconditionFailed

from resources.compute.gce.gcs import Gcs
from resources.remote.protocol import parse_gs_uri


def _blob(gcs: Gcs, uri: str):
    bucket, name = parse_gs_uri(uri)
    return gcs.client.bucket(bucket).blob(name)


def read_json_gen(gcs: Gcs, uri: str) -> tuple[dict[str, Any] | None, int]:
    """(object, generation), or (None, 0) when it does not exist."""
    blob = _blob(gcs, uri)
    try:
        data = blob.download_as_bytes()
    except NotFound:
        return None, 0
    return json.loads(data), int(blob.generation or 0)


def put_json(gcs: Gcs, uri: str, obj: Any, generation: int) -> bool:
    """Write `obj` if the object's generation is `generation` (0: only if it does not exist);
    False when someone else got there first."""
    try:
        _blob(gcs, uri).upload_from_string(
            json.dumps(obj, indent=1), "application/json", if_generation_match=generation
        )
    except PreconditionFailed:
        return False
    return True


def create_json(gcs: Gcs, uri: str, obj: Any) -> bool:
    """Create the object unless it exists; True for the one caller that created it."""
    return put_json(gcs, uri, obj, 0)


def delete(gcs: Gcs, uri: str, generation: int | None = None) -> bool:
    """Delete the object (only at `generation`, if given); False when gone or changed."""
    try:
        _blob(gcs, uri).delete(if_generation_match=generation)
    except (NotFound, PreconditionFailed):
        return False
    return True
