"""One adapter training run: LoRA-SFT or DPO-with-LoRA on a base model.

This is the unit of work behind every ``adapter`` partition. It takes a base
model directory (HF layout), a ``TrainSpec`` (method, task, seed and
hyper-parameters) and writes a PEFT adapter (``adapter_model.safetensors`` +
``adapter_config.json``) whose weight update the spectral analysis measures.

Training goes through TRL's ``SFTTrainer`` / ``DPOTrainer`` rather than a
hand-written loop so that adapters are made the way practitioners make them.
Runs are seeded so the same spec on the same machine yields a bitwise-identical
adapter, and can checkpoint to a directory and resume from it (a preempted GPU
VM restarts the step from its last checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging as hf_logging

from lab_assets.ml import LLAMA_TARGET_MODULES
from lab_assets.ml.adapter_io import set_base_model
from lab_assets.ml.tasks import preference_pairs, sft_examples
from lab_assets.ml.tiny_model import torch_cpu_threads

METHODS: tuple[str, ...] = ("lora_sft", "dpo")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class TrainSpec:
    method: str
    task: str
    seed: int
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = LLAMA_TARGET_MODULES
    steps: int = 30
    learning_rate: float = 1e-3
    batch_size: int = 8
    use_rslora: bool = False
    n_examples: int = 256
    dpo_beta: float = 0.1
    max_length: int = 64
    # DPO's control arm: chosen and rejected swapped at random (tasks.preference_pairs)
    shuffle_preferences: bool = False


@dataclass
class TrainResult:
    first_loss: float
    final_loss: float
    steps: int
    wall_s: float
    trainable_params: int
    loss_curve: list[float] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"


class _LossLogger(TrainerCallback):
    """Forwards logged training losses to ``log`` (the trainers' tqdm bars are off): the
    first and last step, and otherwise at most one line per ``min_interval_s`` (where
    each line becomes an event in a run's log, a step per event would swamp it)."""

    def __init__(
        self, log: Callable[[str], None], method: str, min_interval_s: float = 0.0
    ) -> None:
        self._log = log
        self._method = method
        self._min_interval_s = min_interval_s
        self._last = -float("inf")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        now = time.monotonic()
        edge = state.global_step in (1, state.max_steps)
        if edge or now - self._last >= self._min_interval_s:
            self._last = now
            self._log(
                f"{self._method} step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}"
            )


def _latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Newest ``checkpoint-N`` whose ``trainer_state.json`` exists (the Trainer writes it last)."""
    if not checkpoint_dir.is_dir():
        return None
    complete = []
    for p in checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file():
            complete.append((int(suffix), p))
    return max(complete)[1] if complete else None


_RUN_FILE = "lab_train_run.json"


def _claim_checkpoint_dir(
    checkpoint_dir: Path, spec: TrainSpec, device: str, precision: str
) -> tuple[str, str]:
    """Record which run owns ``checkpoint_dir``; refuse checkpoints of a different run.

    Only ``steps`` may change between attempts (resuming with more steps extends
    a run). Returns the recorded ``(device, precision)`` of the first attempt.
    """
    run = {k: v for k, v in asdict(spec).items() if k != "steps"}
    run["target_modules"] = list(run["target_modules"])
    path = checkpoint_dir / _RUN_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded["spec"] != run:
            raise ValueError(
                f"{checkpoint_dir} holds checkpoints of another run ({recorded['spec']}); "
                f"this run is {run}"
            )
        return recorded["device"], recorded["precision"]
    path.write_text(json.dumps({"spec": run, "device": device, "precision": precision}))
    return device, precision


def _checkpoint_losses(checkpoint: Path) -> tuple[int, list[float]]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state["global_step"]), _loss_curve(state["log_history"])


def _loss_curve(log_history: list[dict]) -> list[float]:
    losses = {int(e["step"]): float(e["loss"]) for e in log_history if "loss" in e}
    return [losses[s] for s in sorted(losses)]


def _device_and_precision() -> tuple[str, str]:
    if torch.cuda.is_available():
        return "cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "cpu", "fp32"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No datasets/transformers progress bars, no known-harmless deprecation noise."""
    import datasets

    bars = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # PEFT/TRL still call the v5-deprecated `is_gradient_checkpointing`.
            warnings.filterwarnings(
                "ignore", message=".*gradient_checkpointing.*", category=FutureWarning
            )
            yield
    finally:
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            hf_logging.enable_progress_bar()


def train_adapter(
    base_model_dir: str | Path,
    out_dir: str | Path,
    spec: TrainSpec,
    log: Callable[[str], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    *,
    checkpoint_every: int = 10,
    cpu_threads: int | None = 1,
    extra_callbacks: Sequence[TrainerCallback] = (),
    log_every_s: float = 0.0,
    base_model_name: str | None = None,
    base_model_revision: str | None = None,
) -> TrainResult:
    """Train one LoRA adapter per ``spec`` on the model in ``base_model_dir``; save it to ``out_dir``.

    ``out_dir`` ends up holding ``adapter_model.safetensors`` and
    ``adapter_config.json`` (PEFT layout). With ``checkpoint_dir``, a checkpoint
    is written there every ``checkpoint_every`` steps and at the end, and the run
    first resumes from the newest complete checkpoint there, if any; the caller
    owns (and eventually deletes) that directory. Otherwise the trainer's
    scratch directory is a temporary sibling of ``out_dir``, removed afterwards.

    On CPU, torch runs with ``cpu_threads`` threads during the call (``None``
    leaves torch's setting alone). One is the default: the tiny model's
    matrices gain nothing from more, and when other processes share the cores
    multi-threaded torch runs 10-30x slower.

    ``extra_callbacks`` are added to the Trainer's (e.g. the GCE launcher's
    checkpoint-on-preemption callback). ``log`` gets every step's loss, or with
    ``log_every_s`` the first and last and at most one per that many seconds.

    ``base_model_name`` (and ``base_model_revision``), when given, replace the base path
    PEFT records in ``adapter_config.json`` (``adapter_io.set_base_model``): a Hub repo
    id, or a path relative to ``out_dir``, so the saved adapter names its base portably.
    """
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; known methods: {', '.join(METHODS)}")
    if spec.shuffle_preferences and spec.method != "dpo":
        raise ValueError("shuffle_preferences is a DPO control: the method must be dpo")
    # Fail before loading anything on an unknown task.
    if spec.method == "lora_sft":
        data = sft_examples(spec.task, spec.n_examples, spec.seed)
    else:
        data = preference_pairs(
            spec.task, spec.n_examples, spec.seed, shuffled=spec.shuffle_preferences
        )
    log = log or (lambda _msg: None)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    device, precision = _device_and_precision()

    scratch: str | None = None
    resume: Path | None = None
    if checkpoint_dir is not None:
        trainer_dir = Path(checkpoint_dir)
        resume, finished = _resume_point(trainer_dir, out_dir, spec, device, precision, t0, log)
        if finished is not None:
            if base_model_name is not None:
                set_base_model(out_dir, base_model_name, base_model_revision)
            return finished
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=f".{out_dir.name}-trainer-", dir=out_dir.parent)
        trainer_dir = Path(scratch)
    args = _trainer_args(
        spec, trainer_dir, device, precision, checkpoint_dir is not None, checkpoint_every
    )

    with contextlib.ExitStack() as stack:
        if scratch is not None:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        stack.enter_context(_quiet())
        if device == "cpu" and cpu_threads is not None:
            stack.enter_context(torch_cpu_threads(cpu_threads))
        callbacks = [_LossLogger(log, spec.method, log_every_s), *extra_callbacks]
        trainer = _make_trainer(base_model_dir, spec, data, args, precision, callbacks)
        if resume is not None:
            log(f"resuming from {resume}")
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)

        peft_model = trainer.model
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(out_dir)
        (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
        if base_model_name is not None:
            set_base_model(out_dir, base_model_name, base_model_revision)
        # After a resume, log_history also holds the steps from before the restart.
        loss_curve = _loss_curve(trainer.state.log_history)
        global_step = int(trainer.state.global_step)
    return _result(spec, loss_curve, global_step, t0, trainable, device, precision, log)


def _resume_point(
    trainer_dir: Path,
    out_dir: Path,
    spec: TrainSpec,
    device: str,
    precision: str,
    t0: float,
    log: Callable[[str], None],
) -> tuple[Path | None, TrainResult | None]:
    """The checkpoint to resume from, or the result of a finished run exported as is."""
    trainer_dir.mkdir(parents=True, exist_ok=True)
    first_device, first_precision = _claim_checkpoint_dir(trainer_dir, spec, device, precision)
    resume = _latest_checkpoint(trainer_dir)
    if resume is not None and (first_device, first_precision) != (device, precision):
        log(f"note: resuming a {first_device}/{first_precision} run on {device}/{precision}")
    done, curve = _checkpoint_losses(resume) if resume is not None else (0, [])
    if done > spec.steps:
        raise ValueError(f"{resume} is past step {spec.steps}: it belongs to a longer run")
    if resume is None or done < spec.steps:
        return resume, None
    # Training finished but the adapter was not exported: the Trainer would
    # run one extra step when resumed here, so export the checkpoint as is.
    log(f"{resume} is the finished run; exporting it")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _ADAPTER_FILES:
        shutil.copyfile(resume / name, out_dir / name)
    with safe_open(str(out_dir / _ADAPTER_FILES[0]), framework="pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    finished = _result(spec, curve, done, t0, n_params, first_device, first_precision, log)
    return resume, finished


def _trainer_args(
    spec: TrainSpec,
    trainer_dir: Path,
    device: str,
    precision: str,
    checkpointing: bool,
    checkpoint_every: int,
) -> dict[str, Any]:
    """Arguments shared by ``SFTConfig`` and ``DPOConfig``."""
    return dict(
        output_dir=str(trainer_dir),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=spec.learning_rate,
        logging_strategy="steps",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        seed=spec.seed,
        data_seed=spec.seed,
        # CPU kernels are deterministic already; on CUDA this also selects
        # deterministic algorithms and a fixed cuBLAS workspace.
        full_determinism=device == "cuda",
        use_cpu=device == "cpu",
        bf16=precision == "bf16",  # TRL's default is bf16=True, even on CPU
        # TRL turns (deprecated-named) gradient checkpointing on by default; it
        # only slows small models down.
        activation_checkpointing=False,
        max_length=spec.max_length,
        dataloader_num_workers=0,
        save_strategy="steps" if checkpointing else "no",
        save_steps=max(1, checkpoint_every),
        save_total_limit=2,
    )


def _make_trainer(
    base_model_dir: str | Path,
    spec: TrainSpec,
    data: list[dict],
    args: dict[str, Any],
    precision: str,
    callbacks: list[TrainerCallback],
) -> Any:
    """The TRL trainer for ``spec.method``, with a LoRA ``peft_config`` on the base model."""
    # Imported here: TRL/PEFT/datasets are heavy and only training needs them.
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    peft_config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        base_model_dir, dtype=torch.bfloat16 if precision == "bf16" else torch.float32
    )
    train_dataset = datasets.Dataset.from_list(data)
    if spec.method == "lora_sft":
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**args, packing=False, completion_only_loss=True),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    else:
        # No ref_model: with a peft_config, DPOTrainer scores the reference
        # with the adapters disabled, i.e. the base model.
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**args, beta=spec.dpo_beta),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    # With disable_tqdm the Trainer prints every log dict to stdout instead.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _result(
    spec: TrainSpec,
    loss_curve: list[float],
    steps: int,
    t0: float,
    trainable: int,
    device: str,
    precision: str,
    log: Callable[[str], None],
) -> TrainResult:
    wall_s = time.perf_counter() - t0
    result = TrainResult(
        first_loss=loss_curve[0] if loss_curve else float("nan"),
        final_loss=loss_curve[-1] if loss_curve else float("nan"),
        steps=steps,
        wall_s=wall_s,
        trainable_params=trainable,
        loss_curve=loss_curve,
        device=device,
        precision=precision,
    )
    log(
        f"{spec.method}/{spec.task}/seed{spec.seed}: loss {result.first_loss:.4f} -> "
        f"{result.final_loss:.4f} in {result.steps} steps, {wall_s:.2f}s on {device} ({precision})"
    )
    return result
