"""The GCS artifact store: generation-pinned manifests, sliced transfers, a verified cache."""
