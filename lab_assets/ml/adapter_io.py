"""Read PEFT LoRA adapters from disk without PEFT, one module at a time.

The spectral features only need each module's two LoRA factors and its scale,
so loading a whole ``PeftModel`` (and its base model) would be wasteful. This
module parses ``adapter_config.json``, refuses adapter variants whose update is
not ``ΔW = scale · B @ A`` (DoRA, LoHa, LoKr, embedding LoRA, ...), and streams
the factors out of ``adapter_model.safetensors`` through ``safe_open`` (mmap),
so at most one module's factors are materialised at a time.

Per-module rank and alpha follow PEFT's own rules: ``rank_pattern`` /
``alpha_pattern`` keys are matched against the module name exactly like
``peft.utils.other.get_pattern_key`` (first key, in dict order, for which
``re.match(rf"(.*\\.)?({key})$", name)`` succeeds), and the scale is
``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"

# Config switches that change the update away from scale · B @ A (or that make the
# module set differ from the base model's), mapped to the feature's name.
_UNSUPPORTED_FLAGS: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}

# Initialisations that rewrite the base weights (PiSSA variants are matched by prefix).
_BASE_MODIFYING_INITS = {"olora", "corda", "loftq", "lora_ga"}

# Tensor-name fragments of non-LoRA-linear parameters, mapped to the feature's name.
_UNSUPPORTED_KEYS: dict[str, str] = {
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector tensors)",
    "lora_embedding_A": "embedding LoRA (lora_embedding_A tensors)",
    "lora_embedding_B": "embedding LoRA (lora_embedding_B tensors)",
    "lora_B.bias": "a bias on lora_B (lora_B.bias tensors)",
    "modules_to_save": "fully trained extra modules (modules_to_save tensors)",
    "trainable_tokens": "trainable tokens (trainable_tokens tensors)",
    "base_layer": "full base-layer weights stored in the adapter (base_layer tensors)",
}


class UnsupportedAdapterError(ValueError):
    """The adapter exists but is not a plain LoRA whose update is ``scale · B @ A``."""


@dataclass
class LoraModule:
    """One adapted linear module: ``ΔW = scale · B @ A`` in the ``out × in`` orientation.

    ``fan_in_fan_out`` tells that the *base* weight is stored ``in × out``
    (GPT-2 ``Conv1D``); ``A`` and ``B`` themselves always follow the formula above.
    """

    name: str
    A: np.ndarray
    B: np.ndarray
    scale: float
    rank: int
    alpha: float
    fan_in_fan_out: bool

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])


def _adapter_path(adapter_dir: str | Path, filename: str) -> Path:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {adapter_dir}")
    path = adapter_dir / filename
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    return path


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """Parse ``adapter_config.json`` and check it describes a plain LoRA adapter.

    Raises ``FileNotFoundError`` naming the missing path and
    ``UnsupportedAdapterError`` naming the file and the unsupported feature.
    """
    path = _adapter_path(adapter_dir, ADAPTER_CONFIG)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{path}: peft_type {config.get('peft_type')!r} is not supported; "
            "only plain LoRA (peft_type 'LORA') adapters can be analysed"
        )
    for flag, feature in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise UnsupportedAdapterError(
                f"{path}: {feature} is not supported; only plain LoRA updates "
                "ΔW = scale · B @ A can be analysed"
            )
    if config.get("bias", "none") not in ("none", None):
        raise UnsupportedAdapterError(
            f"{path}: trained biases (bias={config['bias']!r}) are not supported; only "
            "plain LoRA updates ΔW = scale · B @ A can be analysed"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and (init in _BASE_MODIFYING_INITS or init.startswith("pissa")):
        raise UnsupportedAdapterError(
            f"{path}: init_lora_weights={init!r} changed the base weights at initialisation, "
            "so scale · B @ A is not the fine-tuning update; save the adapter with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) to convert it"
        )
    if config.get("r") is None or config.get("lora_alpha") is None:
        raise ValueError(f"{path}: missing 'r' or 'lora_alpha'")
    return config


def set_base_model(adapter_dir: str | Path, name: str, revision: str | None = None) -> None:
    """Point ``adapter_config.json`` at its base portably: a Hub repo id (and revision), or
    a path relative to the adapter directory (e.g. ``../../base_model/<model>``).

    PEFT records whatever path the base was loaded from (a worker's scratch or a storage
    root of the machine that trained it); this replaces it after saving, so the config
    names a base that exists wherever the adapter is copied with its base (``lab fetch``).
    """
    path = _adapter_path(adapter_dir, ADAPTER_CONFIG)
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = name
    config["revision"] = revision
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def resolve_base_model(adapter_dir: str | Path) -> str:
    """The base named in ``adapter_config.json``: a relative path resolved against the
    adapter directory when that directory exists, else the name as is (a Hub repo id)."""
    config = json.loads(_adapter_path(adapter_dir, ADAPTER_CONFIG).read_text())
    name = str(config.get("base_model_name_or_path") or "")
    if name.startswith(("./", "../")):
        candidate = (Path(adapter_dir) / name).resolve()
        if candidate.is_dir():
            return str(candidate)
    return name


def get_pattern_key(pattern_keys: Sequence[str], key_to_match: str) -> str:
    """Same matching rule as ``peft.utils.other.get_pattern_key`` (kept in step by a test)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def module_rank_alpha(config: Mapping[str, Any], module_name: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives ``module_name`` (honouring rank/alpha patterns)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module_name), config["r"])
    alpha = alpha_pattern.get(
        get_pattern_key(list(alpha_pattern), module_name), config["lora_alpha"]
    )
    return int(r), float(alpha)


def lora_scale(config: Mapping[str, Any], rank: int, alpha: float) -> float:
    """PEFT's ``scaling``: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def _natural_key(name: str) -> list[Any]:
    # "layers.10" sorts after "layers.9"
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _module_name(key: str, suffix: str) -> str:
    name = key[: -len(suffix)]
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def _index_adapter(
    adapter_dir: str | Path,
) -> tuple[dict[str, Any], Path, dict[str, tuple[str, str]]]:
    from safetensors import safe_open

    config = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").is_file():
            raise UnsupportedAdapterError(
                f"{Path(adapter_dir) / 'adapter_model.bin'}: pickled adapters are not supported; "
                f"save the adapter with safetensors ({ADAPTER_WEIGHTS})"
            )
        raise FileNotFoundError(f"adapter file not found: {weights}")
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    for fragment, feature in _UNSUPPORTED_KEYS.items():
        for key in keys:
            if fragment in key:
                raise UnsupportedAdapterError(
                    f"{weights}: {feature} is not supported (tensor {key!r}); only plain LoRA "
                    "updates ΔW = scale · B @ A can be analysed"
                )
    for key in keys:
        if key.endswith(_A_SUFFIX):
            a_keys[_module_name(key, _A_SUFFIX)] = key
        elif key.endswith(_B_SUFFIX):
            b_keys[_module_name(key, _B_SUFFIX)] = key
        else:
            raise UnsupportedAdapterError(
                f"{weights}: tensor {key!r} is not a LoRA factor (*.lora_A.weight / "
                "*.lora_B.weight); this adapter type is not supported"
            )
    unpaired = sorted(set(a_keys) ^ set(b_keys))
    if unpaired:
        raise ValueError(f"{weights}: modules with only one of lora_A / lora_B: {unpaired[:5]}")
    if not a_keys:
        raise ValueError(f"{weights}: no LoRA factors found")
    names = sorted(a_keys, key=_natural_key)
    return config, weights, {n: (a_keys[n], b_keys[n]) for n in names}


def _to_float64(tensor: Any) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; the upcast is exact
        tensor = tensor.to(torch.float32)
    return tensor.numpy().astype(np.float64)


def iter_lora_modules(adapter_dir: str | Path) -> Iterator[LoraModule]:
    """Yield the adapter's modules one by one, factors upcast to float64.

    Validation (config, tensor names, pairing) happens when this is called, not
    at the first ``next()``; tensors are read lazily from the mmapped file.
    """
    config, weights, pairs = _index_adapter(adapter_dir)
    return _iter_modules(config, weights, pairs)


def _iter_modules(
    config: dict[str, Any], weights: Path, pairs: dict[str, tuple[str, str]]
) -> Iterator[LoraModule]:
    from safetensors import safe_open

    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    with safe_open(str(weights), framework="pt") as f:
        for name, (a_key, b_key) in pairs.items():
            A = _to_float64(f.get_tensor(a_key))
            B = _to_float64(f.get_tensor(b_key))
            if A.ndim != 2 or B.ndim != 2:
                raise UnsupportedAdapterError(
                    f"{weights}: module {name!r} has {A.ndim}-D factors (convolution LoRA?); "
                    "only linear layers are supported"
                )
            if A.shape[0] != B.shape[1]:
                raise ValueError(
                    f"{weights}: module {name!r}: lora_A {A.shape} and lora_B {B.shape} disagree"
                )
            rank, alpha = module_rank_alpha(config, name)
            if rank != A.shape[0]:
                raise ValueError(
                    f"{weights}: module {name!r} has rank {A.shape[0]} in the tensors but "
                    f"{rank} in {ADAPTER_CONFIG} (r / rank_pattern)"
                )
            yield LoraModule(
                name=name,
                A=A,
                B=B,
                scale=lora_scale(config, rank, alpha),
                rank=rank,
                alpha=alpha,
                fan_in_fan_out=fan_in_fan_out,
            )
