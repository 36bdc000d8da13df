"""The experiment as the lab uses it: the validated file plus its expanded runs and keys.

Run ids (the ``run`` partition keys) are derived here, and nowhere else, so they
stay stable and readable; fingerprints of config are made with ``digest``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from lab_assets.experiment.schema import (
    METHOD_SLUG,
    BaseModelSpec,
    ExperimentError,
    ExperimentFile,
    Hyper,
    _Overrides,
    _Strict,
)


class RunSpec(_Strict):
    """One resolved adapter training run: a partition of the `run` dimension."""

    id: str
    method: Literal["lora_sft", "dpo"]
    task: str
    seed: int
    hyper: Hyper
    origin: str  # where in the file it came from, e.g. "grid.0" or "runs.2"

    def fingerprint(self) -> str:
        """Hash of exactly the config that shapes this run's adapter."""
        return digest(
            {
                "method": self.method,
                "task": self.task,
                "seed": self.seed,
                **self.hyper.model_dump(mode="json"),
            }
        )


class Experiment(_Strict):
    """The experiment as the lab uses it: the file plus everything derived from it."""

    path: Path
    text: str  # the YAML document as read: a step elsewhere rebuilds the experiment from it
    file: ExperimentFile
    storage_root: str
    runs: tuple[RunSpec, ...]

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def model_ids(self) -> list[str]:
        return [m.id for m in self.file.base_models]

    @property
    def run_ids(self) -> list[str]:
        return [r.id for r in self.runs]

    def model(self, model_id: str) -> BaseModelSpec:
        for m in self.file.base_models:
            if m.id == model_id:
                return m
        raise KeyError(f"{self.path}: no base model {model_id!r}; known: {self.model_ids}")

    def run(self, run_id: str) -> RunSpec:
        for r in self.runs:
            if r.id == run_id:
                return r
        raise KeyError(f"{self.path}: no run {run_id!r}")

    def model_fingerprint(self, model_id: str) -> str:
        return digest(self.model(model_id).model_dump(mode="json"))

    def target_modules(self) -> list[str]:
        """Every module suffix any run adapts (the base spectrum covers all of them)."""
        out: list[str] = []
        for r in self.runs:
            out.extend(m for m in r.hyper.target_modules if m not in out)
        return out


def digest(obj: Any) -> str:
    """A short, stable hash of JSON-able config (sorted keys): fingerprints are made of these."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_id_for(method: str, task: str, hyper: Hyper, seed: int, tag: str | None) -> str:
    base = f"{METHOD_SLUG[method]}-{task}-r{hyper.rank}-s{seed}"
    return f"{base}-{tag}" if tag else base


def expand_runs(f: ExperimentFile, path: Path) -> tuple[RunSpec, ...]:
    runs: list[RunSpec] = []
    where: dict[str, str] = {}

    def add(origin: str, method: str, task: str, seed: int, entry: _Overrides) -> None:
        hyper = f.defaults.model_copy(update=entry.overrides())
        hyper = Hyper.model_validate(hyper.model_dump())
        rid = run_id_for(method, task, hyper, seed, entry.tag)
        if rid in where:
            raise ExperimentError(
                f"{path}: {origin}: duplicate run id {rid!r} (also produced by {where[rid]}); "
                "give one of them a distinct 'tag'"
            )
        where[rid] = origin
        runs.append(
            RunSpec(id=rid, method=method, task=task, seed=seed, hyper=hyper, origin=origin)
        )

    for i, g in enumerate(f.grid):
        for method in g.methods:
            for task in g.tasks:
                for seed in g.seeds:
                    add(f"grid.{i}", method, task, seed, g)
    for i, r in enumerate(f.runs):
        add(f"runs.{i}", r.method, r.task, r.seed, r)
    return tuple(runs)
