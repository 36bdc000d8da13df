"""A launcher for compute the lab cannot reach: every launch fails with the reason.

Definitions still load (so the graph, partitions and config validation work),
but a step that needs the missing compute fails loudly instead of silently
running somewhere else.
"""

from __future__ import annotations

from collections.abc import Iterator

from dagster._config.pythonic_config import ConfigurableResourceFactory
from dagster._core.definitions.step_launcher import StepLauncher
from dagster._core.events import DagsterEvent


class _Refuse(StepLauncher):
    def __init__(self, reason: str):
        self.reason = reason

    def launch_step(self, step_context) -> Iterator[DagsterEvent]:
        raise RuntimeError(self.reason)


class UnavailableStepLauncher(ConfigurableResourceFactory[StepLauncher]):
    reason: str

    def create_resource(self, context) -> StepLauncher:
        return _Refuse(self.reason)
