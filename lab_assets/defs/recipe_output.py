"""An asset's output stamped with its recipe: what makes a partition stale, or not.

The recipe (``experiment.versions.recipe``) is built from the experiment, the asset's
code version and the fingerprints recorded in the manifests of the inputs the asset
read; its fingerprint becomes the output's Dagster data version and the
``lab/fingerprint`` metadata that the IO manager writes into the manifest.
"""

from __future__ import annotations

import warnings
from typing import Any

from dagster import BetaWarning, DataVersion, Output

from lab_assets.experiment.resolved import Experiment
from lab_assets.experiment.versions import recipe, ref, upstream
from resources.io_manager import LabStorage


def output_with_recipe(
    exp: Experiment,
    storage: LabStorage,
    asset_name: str,
    partition: str | None,
    value: Any,
    meta: dict,
) -> Output:
    """The output with its recipe, built from the fingerprints of the inputs it read."""
    inputs = {}
    for a, q in upstream(exp, asset_name, partition):
        m = storage.store.read_manifest(a, q)
        inputs[ref(a, q)] = m.metadata.get("fingerprint", "unrecorded") if m else "missing"
    r = recipe(exp, asset_name, partition, inputs)
    meta = {**meta, "lab/fingerprint": r.fingerprint, "lab/recipe": r.to_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BetaWarning)  # data_version= is beta in 1.13
        return Output(value, metadata=meta, data_version=DataVersion(r.fingerprint))
