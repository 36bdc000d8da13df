"""The task-geometry experiment as Dagster assets: config schema, partitions, assets,
checks and ``definitions.py``. Plain ML code lives in ``lab_assets.ml``."""
