"""The experiment file's schema: every field, its type, its bounds (pydantic, no Dagster).

One YAML file describes a whole experiment. It is validated when the Dagster
definitions load, so a typo stops everything before anything runs, with an
error that names the file and the field at fault (``load``).

Every number has an upper bound as well as a lower one, floats must be finite,
seeds are integers in [0, 2**31-1], free text and lists are capped: a hostile or
mistyped file (``steps: 1e20``, ``learning_rate: .inf``, a megabyte description) is
refused with the bound in the message, never accepted to fail hours later. The
bounds are generous (the ``MAX_*`` constants below); raise one if a real
experiment needs it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticKnownError

from lab_assets.ml import LLAMA_TARGET_MODULES
from lab_assets.ml.controls import ARMS, MAIN_ARM, SHUFFLED_PREFERENCES
from lab_assets.ml.tasks import TASKS
from resources.compute.gce.settings import GceSettings


class ExperimentError(ValueError):
    """The experiment file is missing or invalid; the message names the file and field."""


METHODS = ("lora_sft", "dpo")
METHOD_SLUG = {"lora_sft": "sft", "dpo": "dpo"}
_SLUG = r"^[a-z0-9][a-z0-9._-]{0,62}$"


MAX_SEED = 2**31 - 1  # numpy/torch generators take 32-bit seeds
MAX_STEPS = 1_000_000
MAX_EXAMPLES = 10_000_000
MAX_BATCH = 4096
MAX_TEXT = 10_000  # characters of free text (description)
MAX_NAME = 256  # characters of a short string: a module name, a revision, a cron line
MAX_PATH = 1024  # characters of the storage root
MAX_BASE_MODELS = 64
MAX_GRID_ENTRIES = 1000
MAX_RUN_ENTRIES = 10_000
MAX_SEEDS = 1000  # per grid entry
MAX_TARGET_MODULES = 64
MAX_LR = 10.0


def _range_first(lo: int, hi: int) -> Any:
    """Check the bounds before the integer conversion, so that a number too big for an
    integer (``1e20`` or ``1.0e+20`` in YAML) is refused with its bound in the message,
    like any other out-of-range number."""

    def check(v: Any) -> Any:
        if isinstance(v, bool):  # YAML `true` is not a count (pydantic would take it as 1)
            raise PydanticKnownError("int_type")
        if not isinstance(v, int | float | str):
            return v
        try:
            x = float(v)
        except (ValueError, OverflowError):
            return v  # not a number, or an int beyond float: pydantic says which
        if x > hi:
            raise PydanticKnownError("less_than_equal", {"le": hi})
        if x < lo:
            raise PydanticKnownError("greater_than_equal", {"ge": lo})
        return v

    return BeforeValidator(check)


def bounded_int(lo: int, hi: int) -> Any:
    """An ``int`` field type in [lo, hi]; the message of a value outside names the bound."""
    return Annotated[int, _range_first(lo, hi), Field(ge=lo, le=hi)]


def positive_float(hi: float) -> Any:
    """A finite ``float`` field type in (0, hi]: ``.inf`` and ``.nan`` are refused."""
    return Annotated[float, Field(gt=0, le=hi, allow_inf_nan=False)]


Seed = bounded_int(0, MAX_SEED)
_Rank = bounded_int(1, 1024)
_Alpha = positive_float(10_000.0)
_Steps = bounded_int(1, MAX_STEPS)
_LearningRate = positive_float(MAX_LR)
_BatchSize = bounded_int(1, MAX_BATCH)
_NExamples = bounded_int(8, MAX_EXAMPLES)
_DpoBeta = positive_float(100.0)
_ModuleName = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
_TargetModules = Annotated[tuple[_ModuleName, ...], Field(max_length=MAX_TARGET_MODULES)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinySource(_Strict):
    """A tiny Llama-architecture model that the lab builds and pre-trains on CPU."""

    kind: Literal["tiny"]
    hidden_size: bounded_int(16, 4096) = 128
    num_layers: bounded_int(1, 64) = 2
    num_heads: bounded_int(1, 256) = 4
    num_kv_heads: bounded_int(1, 256) = 2
    intermediate_size: bounded_int(16, 32_768) = 256
    vocab_size: bounded_int(64, 262_144) = 512
    max_seq_len: bounded_int(16, 8192) = 64
    pretrain_steps: bounded_int(0, MAX_STEPS) = 200
    pretrain_batch_size: _BatchSize = 16
    learning_rate: _LearningRate = 3e-3
    corpus_size: bounded_int(10, MAX_EXAMPLES) = 4000
    seed: Seed = 0

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
    repo_id: str = Field(pattern=r"^[\w.-]+(/[\w.-]+)?$", max_length=MAX_NAME)
    revision: str = Field(
        min_length=1, max_length=MAX_NAME, description="a commit sha or tag; never a moving branch"
    )

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

    rank: _Rank = 8
    alpha: _Alpha = 16
    target_modules: _TargetModules = LLAMA_TARGET_MODULES
    steps: _Steps = 30
    learning_rate: _LearningRate = 1e-3
    batch_size: _BatchSize = 8
    use_rslora: bool = False
    n_examples: _NExamples = 256
    dpo_beta: _DpoBeta = 0.1

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
    rank: _Rank | None = None
    alpha: _Alpha | None = None
    target_modules: _TargetModules | None = None
    steps: _Steps | None = None
    learning_rate: _LearningRate | None = None
    batch_size: _BatchSize | None = None
    use_rslora: bool | None = None
    n_examples: _NExamples | None = None
    dpo_beta: _DpoBeta | None = None
    tag: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.]{0,30}$")
    # A control arm (lab_assets.ml.controls): "shuffled_preferences" trains DPO on
    # randomly swapped preferences; "norm_matched_lr" marks SFT runs whose learning rate
    # matches DPO's update norm. Kept out of the headline classification.
    arm: Literal[ARMS] = MAIN_ARM  # type: ignore[valid-type]

    def overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _HYPER_FIELDS if getattr(self, k) is not None}


class GridEntry(_Overrides):
    """The cross product methods × tasks × seeds, with optional hyper-parameter overrides."""

    methods: tuple[Literal["lora_sft", "dpo"], ...] = Field(min_length=1, max_length=len(METHODS))
    tasks: tuple[str, ...] = Field(min_length=1, max_length=len(TASKS))
    seeds: tuple[Seed, ...] = Field(min_length=1, max_length=MAX_SEEDS)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_task(t) for t in v)

    @model_validator(mode="after")
    def _arm_fits_methods(self) -> GridEntry:
        _check_arm(self.arm, self.methods)
        return self


class RunEntry(_Overrides):
    """One explicit training run."""

    method: Literal["lora_sft", "dpo"]
    task: str
    seed: Seed = 0

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return _check_task(v)

    @model_validator(mode="after")
    def _arm_fits_method(self) -> RunEntry:
        _check_arm(self.arm, (self.method,))
        return self


def _check_arm(arm: str, methods: tuple[str, ...]) -> None:
    if arm == SHUFFLED_PREFERENCES and set(methods) != {"dpo"}:
        raise ValueError(f"arm {arm!r} shuffles DPO's preferences: methods must be [dpo]")


class SpectrumSpec(_Strict):
    """``top_k``: the base's top singular vectors the subspace overlaps use.
    ``base_k``: how many singular triplets of each base weight are stored (None: all of
    a weight whose smaller side is at most 1024, ``top_k`` of bigger ones, whose full
    SVD would take hours on a CPU and gigabytes of storage).
    ``intruder_k``/``intruder_threshold``: Shuttleworth et al.'s k and ε (10, 0.5)."""

    top_k: bounded_int(1, 4096) = 16
    base_k: bounded_int(1, 65_536) | None = None
    intruder_k: bounded_int(1, 4096) = 10
    intruder_threshold: float = Field(0.5, gt=0, lt=1, allow_inf_nan=False)


class ClassificationSpec(_Strict):
    """``n_permutations``: per permutation test (the p-value floor is 1/(n+1))."""

    n_permutations: bounded_int(0, 10_000) = 200


class LocalCompute(_Strict):
    kind: Literal["local"]


class GceCompute(GceSettings):
    """Disposable GCE VMs for GPU steps: the GCE launcher's settings, every field and bound
    (``resources.compute.gce.settings.GceSettings``), under ``kind: gce``."""

    kind: Literal["gce"]


class SweepSpec(_Strict):
    """Scheduled sweeps of missing/stale partitions, and how many training steps run at once."""

    cron: str | None = Field(None, max_length=MAX_NAME)
    timezone: str = Field("UTC", max_length=MAX_NAME)
    # GCE: the GPU quota (the `gpu` pool's limit). Local: the `cpu` pool's limit
    # (None: the machine's cores).
    max_gpu_in_flight: bounded_int(1, 1000) = 1
    max_local_in_flight: bounded_int(1, 256) | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        from dagster._utils.schedules import is_valid_cron_string

        if v is not None and not is_valid_cron_string(v):
            raise ValueError(f"{v!r} is not a valid cron schedule")
        return v


class BudgetSpec(_Strict):
    max_usd: float = Field(0.0, ge=0, le=1_000_000, allow_inf_nan=False)


class ExperimentFile(_Strict):
    """The YAML document as written."""

    name: str = Field(pattern=_SLUG)
    description: str = Field("", max_length=MAX_TEXT)
    storage: str = Field(min_length=1, max_length=MAX_PATH)
    base_models: tuple[BaseModelSpec, ...] = Field(min_length=1, max_length=MAX_BASE_MODELS)
    defaults: Hyper = Hyper()
    grid: tuple[GridEntry, ...] = Field((), max_length=MAX_GRID_ENTRIES)
    runs: tuple[RunEntry, ...] = Field((), max_length=MAX_RUN_ENTRIES)
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
