"""The experiment file: its schema, loading, and everything derived from it (no Dagster)."""
