"""Run a step in a disposable local worker process."""
