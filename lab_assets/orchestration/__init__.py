"""Driving Dagster from outside a run: planning, launching and watching runs."""
