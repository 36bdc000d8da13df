"""Picks the artifact-store backend for a storage root: the one place that knows them all.

It sits above ``resources.storage.local`` and ``resources.storage.gcs`` so that neither
backend (nor ``resources.storage.base``) has to import another. The GCS backend is
imported only when a ``gs://`` root is opened, so local-only callers never load the
Google client libraries.
"""

from __future__ import annotations

from resources.storage.base import ArtifactStore, StorageError
from resources.storage.local import LocalArtifactStore


def open_store(root: str, experiment: str) -> ArtifactStore:
    """The store for a storage root: a local path, or `gs://bucket/prefix`."""
    if root.startswith("gs://"):
        try:
            from resources.storage.gcs.store import GCSArtifactStore
        except ImportError as e:  # pragma: no cover - google-cloud-storage missing
            raise StorageError(f"{root}: the gs:// backend is not available: {e}") from e
        return GCSArtifactStore(root, experiment)
    return LocalArtifactStore(root, experiment)
