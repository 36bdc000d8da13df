"""Artifact stores: partitions as real files with a manifest, on local disk or in GCS."""
