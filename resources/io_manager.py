"""The IO manager that stores asset partitions as directories of real files.

An asset returns the local directory it wrote (safetensors, parquet, JSON, PNG);
this IO manager commits it to the artifact store under
``<root>/<experiment>/<asset>/<partition>/`` with the manifest last, and hands
downstream assets a local directory to read. It never pickles a model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from dagster import (
    ConfigurableIOManager,
    ConfigurableResource,
    InputContext,
    MetadataValue,
    OutputContext,
)
from pydantic import PrivateAttr

from resources.remote import launch_info
from resources.storage.base import ArtifactStore
from resources.storage.links import gcs_console_url, is_gcs
from resources.storage.open import open_store

# Output metadata under this prefix is also written into the partition's manifest.
MANIFEST_METADATA_PREFIX = "lab/"


class LabStorage(ConfigurableResource):
    """Where an experiment's artifacts live: a local path or `gs://bucket/prefix`."""

    root: str
    experiment: str
    _store: ArtifactStore | None = PrivateAttr(default=None)

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            self._store = open_store(self.root, self.experiment)
        return self._store


def _asset_name(context: InputContext | OutputContext) -> str:
    """The stored asset's name: the key's last part (a key prefix, such as the experiment's
    name when several share an instance, is already the store's experiment level)."""
    return context.asset_key.path[-1]


class ArtifactIOManager(ConfigurableIOManager):
    """Commits each output directory with a manifest; loads inputs as local directories.

    An input from a partitioned upstream into a partitioned downstream is one
    `Path`; into an unpartitioned downstream (a fan-in) it is a dict of
    partition key -> `Path`.
    """

    storage: LabStorage
    # Remove the asset's scratch output once stored (it is a copy by then).
    remove_committed: bool = True

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if not isinstance(obj, (str, Path)) or not Path(obj).is_dir():
            raise TypeError(
                f"asset {_asset_name(context)} must return the local directory it wrote, "
                f"got {type(obj).__name__}"
            )
        partition = context.partition_key if context.has_partition_key else None
        extra = {
            k.removeprefix(MANIFEST_METADATA_PREFIX): _plain(v)
            for k, v in (context.output_metadata or {}).items()
            if k.startswith(MANIFEST_METADATA_PREFIX)
        }
        store = self.storage.store
        manifest = store.commit(_asset_name(context), partition, Path(obj), metadata=extra)
        if self.remove_committed:
            shutil.rmtree(obj, ignore_errors=True)
        context.add_output_metadata(
            {
                **storage_metadata(store.uri(_asset_name(context), partition)),
                "files": MetadataValue.int(len(manifest.files)),
                "bytes": MetadataValue.int(manifest.total_bytes),
                # On a GCE VM: zone, machine/GPU, spot, VM seconds and cost so far.
                **launch_info.output_metadata(),
            }
        )

    def load_input(self, context: InputContext) -> Path | dict[str, Path]:
        """Local directories of the input partitions, each verified against its manifest.

        Raises `IntegrityError` (naming asset, partition, file, expected and found) for
        a corrupt, truncated, missing or stray file, so downstream code never computes
        on damaged data. Hashes are remembered per unchanged file, so a multi-GB input
        is hashed once, not on every read (`resources.storage.integrity`).
        """
        store = self.storage.store
        asset = _asset_name(context)
        if not context.has_asset_partitions:
            return store.verified_path(asset, None)
        keys = list(context.asset_partition_keys)
        if context.has_partition_key and len(keys) == 1:
            return store.verified_path(asset, keys[0])
        return {k: store.verified_path(asset, k) for k in keys}


def storage_metadata(uri: str) -> dict[str, MetadataValue]:
    """Where a partition is stored: `storage_uri` as the store names it (a path, or the
    `gs://` URI to paste into gcloud), and for GCS also `storage_console`, its web page."""
    if is_gcs(uri):
        return {
            "storage_uri": MetadataValue.text(uri),
            "storage_console": MetadataValue.url(gcs_console_url(uri)),
        }
    return {"storage_uri": MetadataValue.path(uri)}


def storage_link(uri: str, *, is_file: bool = False) -> MetadataValue:
    """A stored folder or file as typed metadata: a console URL for `gs://`, else a path."""
    if is_gcs(uri):
        return MetadataValue.url(gcs_console_url(uri, is_file=is_file))
    return MetadataValue.path(uri)


def _plain(v: Any) -> Any:
    """Dagster metadata values to JSON-able values for the manifest."""
    return getattr(v, "value", v)
