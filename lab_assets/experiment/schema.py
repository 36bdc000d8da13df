"""The experiment file's schema: every field, its type, its bounds (pydantic, no Dagster).

One YAML file describes a whole experiment. It is validated when the Dagster
definitions load, so a typo stops everything before anything runs, with an
error that names the file and the field at fault (``load``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lab_assets.ml import LLAMA_TARGET_MODULES
from lab_assets.ml.tasks import TASKS
from resources.compute.gce.settings import GceSettings


class ExperimentError(ValueError):
    """The experiment file is missing or invalid; the message names the file and field."""


METHODS = ("lora_sft", "dpo")
METHOD_SLUG = {"lora_sft": "sft", "dpo": "dpo"}
_SLUG = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinySource(_Strict):
    """A tiny Llama-architecture model that the lab builds and pre-trains on CPU."""

    kind: Literal["tiny"]
    hidden_size: int = Field(128, ge=16, le=4096)
    num_layers: int = Field(2, ge=1, le=64)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(256, ge=16)
    vocab_size: int = Field(512, ge=64)
    max_seq_len: int = Field(64, ge=16)
    pretrain_steps: int = Field(200, ge=0)
    pretrain_batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    corpus_size: int = Field(4000, ge=10)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinySource:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        return self


class HubSource(_Strict):
    """A Hugging Face Hub model at a pinned revision, fetched through the model cache."""

    kind: Literal["hub"]
    repo_id: str = Field(pattern=r"^[\w.-]+(/[\w.-]+)?$")
    revision: str = Field(min_length=1, description="a commit sha or tag; never a moving branch")

    @field_validator("revision")
    @classmethod
    def _pinned(cls, v: str) -> str:
        if v in {"main", "master", "HEAD"}:
            raise ValueError(f"revision {v!r} moves; pin a commit sha or a tag")
        return v


class BaseModelSpec(_Strict):
    id: str = Field(pattern=_SLUG)
    source: Annotated[TinySource | HubSource, Field(discriminator="kind")]


class Hyper(_Strict):
    """Training hyper-parameters; every field may be overridden per grid entry or run."""

    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0)
    target_modules: tuple[str, ...] = LLAMA_TARGET_MODULES
    steps: int = Field(30, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    use_rslora: bool = False
    n_examples: int = Field(256, ge=8)
    dpo_beta: float = Field(0.1, gt=0)

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("target_modules must name at least one module")
        return v


_HYPER_FIELDS = tuple(Hyper.model_fields)


def _check_task(v: str) -> str:
    if v not in TASKS:
        raise ValueError(f"unknown task {v!r}; known tasks: {', '.join(TASKS)}")
    return v


class _Overrides(_Strict):
    rank: int | None = Field(None, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0)
    target_modules: tuple[str, ...] | None = None
    steps: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    use_rslora: bool | None = None
    n_examples: int | None = Field(None, ge=8)
    dpo_beta: float | None = Field(None, gt=0)
    tag: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.]{0,30}$")

    def overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _HYPER_FIELDS if getattr(self, k) is not None}


class GridEntry(_Overrides):
    """The cross product methods × tasks × seeds, with optional hyper-parameter overrides."""

    methods: tuple[Literal["lora_sft", "dpo"], ...] = Field(min_length=1)
    tasks: tuple[str, ...] = Field(min_length=1)
    seeds: tuple[int, ...] = Field(min_length=1)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_task(t) for t in v)


class RunEntry(_Overrides):
    """One explicit training run."""

    method: Literal["lora_sft", "dpo"]
    task: str
    seed: int = 0

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return _check_task(v)


class SpectrumSpec(_Strict):
    top_k: int = Field(16, ge=1, le=4096)
    intruder_threshold: float = Field(0.5, gt=0, lt=1)


class ClassificationSpec(_Strict):
    n_permutations: int = Field(200, ge=0, le=10000)


class LocalCompute(_Strict):
    kind: Literal["local"]


class GceCompute(GceSettings):
    """Disposable GCE VMs for GPU steps: the GCE launcher's settings, every field and bound
    (``resources.compute.gce.settings.GceSettings``), under ``kind: gce``."""

    kind: Literal["gce"]


class SweepSpec(_Strict):
    """Scheduled sweeps of missing/stale partitions, and how many training steps run at once."""

    cron: str | None = None
    timezone: str = "UTC"
    # GCE: the GPU quota (the `gpu` pool's limit). Local: the `cpu` pool's limit
    # (None: the machine's cores).
    max_gpu_in_flight: int = Field(1, ge=1, le=1000)
    max_local_in_flight: int | None = Field(None, ge=1, le=256)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        from dagster._utils.schedules import is_valid_cron_string

        if v is not None and not is_valid_cron_string(v):
            raise ValueError(f"{v!r} is not a valid cron schedule")
        return v


class BudgetSpec(_Strict):
    max_usd: float = Field(0.0, ge=0)


class ExperimentFile(_Strict):
    """The YAML document as written."""

    name: str = Field(pattern=_SLUG)
    description: str = ""
    storage: str = Field(min_length=1)
    base_models: tuple[BaseModelSpec, ...] = Field(min_length=1)
    defaults: Hyper = Hyper()
    grid: tuple[GridEntry, ...] = ()
    runs: tuple[RunEntry, ...] = ()
    spectrum: SpectrumSpec = SpectrumSpec()
    classification: ClassificationSpec = ClassificationSpec()
    compute: Annotated[LocalCompute | GceCompute, Field(discriminator="kind")] = LocalCompute(
        kind="local"
    )
    budget: BudgetSpec = BudgetSpec()
    sweep: SweepSpec = SweepSpec()

    @model_validator(mode="after")
    def _unique_models(self) -> ExperimentFile:
        seen: dict[str, int] = {}
        for i, m in enumerate(self.base_models):
            if m.id in seen:
                raise ValueError(
                    f"base_models.{i}.id: duplicate model id {m.id!r} (also base_models.{seen[m.id]})"
                )
            seen[m.id] = i
        if not self.grid and not self.runs:
            raise ValueError("the experiment has no runs: give 'grid' or 'runs'")
        return self
