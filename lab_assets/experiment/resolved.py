"""The experiment as the lab uses it: the validated file plus its expanded runs and keys.

Run ids (the ``run`` partition keys) are derived here, and nowhere else, so they
stay stable and readable; fingerprints of config are made with ``digest``.
``check_analysis`` refuses an experiment whose final analysis could not run, so that
no adapter is trained for a classification that would fail at the end.
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
from lab_assets.ml.controls import ARM_SLUG, MAIN_ARM


class RunSpec(_Strict):
    """One resolved adapter training run: a partition of the `run` dimension."""

    id: str
    method: Literal["lora_sft", "dpo"]
    task: str
    seed: int
    hyper: Hyper
    origin: str  # where in the file it came from, e.g. "grid.0" or "runs.2"
    arm: str = MAIN_ARM  # a control arm (lab_assets.ml.controls) or the main one

    def fingerprint(self) -> str:
        """Hash of exactly the config that shapes this run's adapter."""
        return digest(
            {
                "method": self.method,
                "task": self.task,
                "seed": self.seed,
                **self.hyper.model_dump(mode="json"),
                # the main arm's hash stays what it was before arms existed
                **({"arm": self.arm} if self.arm != MAIN_ARM else {}),
            }
        )


class Experiment(_Strict):
    """The experiment as the lab uses it: the file plus everything derived from it."""

    path: Path
    text: str  # the YAML document as read: a step elsewhere rebuilds the experiment from it
    file: ExperimentFile
    storage_root: str
    runs: tuple[RunSpec, ...]
    # Environment variables the file left at their ${NAME:-default} placeholder (load.py):
    # the experiment validates, but nothing may touch the cloud until they are set.
    placeholders: tuple[str, ...] = ()
    # Asset keys are `<prefix...>/<asset>`: empty (the default: `adapter`, ...), or the
    # experiment's name when several experiments share one Dagster instance (load.py).
    asset_prefix: tuple[str, ...] = ()

    def key_path(self, asset: str) -> list[str]:
        """The Dagster asset key path of `asset` (`adapter` or `[tiny, adapter]`)."""
        return [*self.asset_prefix, asset]

    def require_settings(self, what: str) -> None:
        """Refuse `what` while a placeholder stands in for a real value."""
        if self.placeholders:
            names = " ".join(f"{n}=..." for n in self.placeholders)
            raise ExperimentError(
                f"{self.path}: {what} needs real values for {', '.join(self.placeholders)} "
                f"(the file's placeholders are in use): export {names}"
            )

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


def run_id_for(
    method: str, task: str, hyper: Hyper, seed: int, tag: str | None, arm: str = MAIN_ARM
) -> str:
    """``<method>-<task>-r<rank>-s<seed>[-<tag>]``; a control arm without a tag gets its
    slug as the tag (``dpo-arith-r8-s0-shuf``)."""
    base = f"{METHOD_SLUG[method]}-{task}-r{hyper.rank}-s{seed}"
    tag = tag or ARM_SLUG.get(arm)
    return f"{base}-{tag}" if tag else base


# Adapter partitions (base models × runs) an experiment may have: each is a training run
# and a Dagster partition; more than this is a typo (a seed range pasted twice over).
MAX_ADAPTERS = 10_000


def expand_runs(f: ExperimentFile, path: Path) -> tuple[RunSpec, ...]:
    n_runs = len(f.runs) + sum(len(g.methods) * len(g.tasks) * len(g.seeds) for g in f.grid)
    if n_runs * len(f.base_models) > MAX_ADAPTERS:
        raise ExperimentError(
            f"{path}: grid, runs: {n_runs} runs × {len(f.base_models)} base models = "
            f"{n_runs * len(f.base_models)} adapters; at most {MAX_ADAPTERS} are allowed"
        )
    runs: list[RunSpec] = []
    where: dict[str, str] = {}

    def add(origin: str, method: str, task: str, seed: int, entry: _Overrides) -> None:
        hyper = f.defaults.model_copy(update=entry.overrides())
        hyper = Hyper.model_validate(hyper.model_dump())
        rid = run_id_for(method, task, hyper, seed, entry.tag, entry.arm)
        if rid in where:
            raise ExperimentError(
                f"{path}: {origin}: duplicate run id {rid!r} (also produced by {where[rid]}); "
                "give one of them a distinct 'tag'"
            )
        where[rid] = origin
        runs.append(
            RunSpec(
                id=rid,
                method=method,
                task=task,
                seed=seed,
                hyper=hyper,
                origin=origin,
                arm=entry.arm,
            )
        )

    for i, g in enumerate(f.grid):
        for method in g.methods:
            for task in g.tasks:
                for seed in g.seeds:
                    add(f"grid.{i}", method, task, seed, g)
    for i, r in enumerate(f.runs):
        add(f"runs.{i}", r.method, r.task, r.seed, r)
    return tuple(runs)


def check_analysis(f: ExperimentFile, runs: tuple[RunSpec, ...], path: Path) -> None:
    """Refuse an experiment whose ``classification_results`` could not run.

    It classifies every adapter's method and its task (``lab_assets.ml.classify``) with
    grouped cross-validation, an adapter's group being ``model/seed``: it needs at least
    two groups (one is held out at a time) and, for each label, at least two classes.
    Only the main arm's runs count: control arms are compared beside the headline.
    Found at validation, not after every adapter has trained.
    """
    runs = tuple(r for r in runs if r.arm == MAIN_ARM)
    groups = sorted({f"{m.id}/s{r.seed}" for m in f.base_models for r in runs})
    problems = []
    if len(groups) < 2:
        seeds = sorted({r.seed for r in runs})
        problems.append(
            f"{path}: seeds: the classification needs at least two seed groups: grouped "
            "cross-validation holds out one group (base model/seed) at a time; got "
            f"{len(groups)} ({', '.join(groups)}, seed{'s' if len(seeds) > 1 else ''} "
            f"{', '.join(map(str, seeds))}); add a seed (or a base model) to the grid or runs"
        )
    for label in ("method", "task"):
        values = sorted({getattr(r, label) for r in runs})
        if len(values) < 2:
            problems.append(
                f"{path}: {label}s: the classification of {label} needs at least two "
                f"{label}s among the runs; got {len(values)} ({', '.join(values)})"
            )
    if problems:
        raise ExperimentError("the experiment's analysis could not run\n  " + "\n  ".join(problems))
