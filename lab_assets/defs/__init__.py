"""The experiment as Dagster definitions: one Dagster concept per module."""
