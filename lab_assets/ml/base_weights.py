"""Base weights, streamed one module at a time, and their stored spectra (all or top-k).

A (possibly sharded) safetensors checkpoint is indexed by key and read lazily
(``safe_open`` is mmapped; sharded checkpoints are followed through
``model.safetensors.index.json``). ``compute_base_spectrum`` keeps the top-k
(or all) singular triplets of every targeted weight, in ``out × in`` orientation, and
``save_base_spectrum``/``load_base_spectrum`` store them in one safetensors file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab_assets.ml.svd import top_k_svd

DEFAULT_TOP_K = 16
# Below this smaller side, the base spectrum the lab stores is complete by default.
FULL_SPECTRUM_MAX_DIM = 1024
_SPECTRUM_FORMAT = "lab-base-spectrum-v1"


@dataclass
class BaseModuleSpectrum:
    """Top-k singular triplets of a base weight in ``out × in`` orientation, S descending."""

    U: np.ndarray  # out × k
    S: np.ndarray  # k
    Vh: np.ndarray  # k × in

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    def truncated(self, k: int) -> BaseModuleSpectrum:
        return BaseModuleSpectrum(self.U[:, :k], self.S[:k], self.Vh[:k])


class SafetensorsModel:
    """Key → file index of a (possibly sharded) safetensors checkpoint, read lazily."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"base model directory not found: {self.model_dir}")
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        self.files: dict[str, Path] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: self.model_dir / fname for key, fname in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {self.model_dir}"
            )

    def matrix_modules(self) -> list[str]:
        """Module names of every 2-D ``*.weight`` tensor."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key, path in self.files.items():
            if key.endswith(".weight"):
                by_file.setdefault(path, []).append(key)
        names = []
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                names += [
                    k[: -len(".weight")] for k in keys if len(f.get_slice(k).get_shape()) == 2
                ]
        return sorted(names)

    def weight_key(self, module_name: str) -> str:
        key = f"{module_name}.weight"
        if key in self.files:
            return key
        # Checkpoints of a bare backbone drop the task wrapper's prefix ("model."),
        # and vice versa: accept a unique key that nests with the name.
        candidates = [
            k
            for k in self.files
            if k.endswith(".weight") and (key.endswith("." + k) or k.endswith("." + key))
        ]
        if len(candidates) == 1:
            return candidates[0]
        raise KeyError(
            f"no unique weight for module {module_name!r} in {self.model_dir} "
            f"(looked for {key!r}; candidates: {candidates[:5]})"
        )

    def load(self, module_name: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        key = self.weight_key(module_name)
        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key).to(torch.float64).numpy()


def load_base_weight(model_dir: str | Path, module_name: str) -> np.ndarray:
    """A base module's weight as float64, in its *stored* orientation (see ``orient_weight``)."""
    return SafetensorsModel(model_dir).load(module_name)


def orient_weight(
    W: np.ndarray, out_features: int, in_features: int, fan_in_fan_out: bool
) -> np.ndarray:
    """Bring a stored base weight to ``out × in``.

    Shapes decide when they can (PEFT flips ``fan_in_fan_out`` in the saved config
    per model, not per module); the flag decides only for square matrices.
    """
    want = (out_features, in_features)
    if W.shape == want and (not fan_in_fan_out or out_features != in_features):
        return W
    if W.T.shape == want:
        return W.T
    raise ValueError(f"base weight has shape {W.shape}, the update is {want} (out × in)")


def _matches(name: str, selectors: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in selectors)


def compute_base_spectrum(
    model_dir: str | Path,
    module_names_or_suffixes: Iterable[str],
    k: int | None = DEFAULT_TOP_K,
    *,
    full_up_to: int = 0,
    fan_in_fan_out: bool = False,
    device: str | None = None,
) -> dict[str, BaseModuleSpectrum]:
    """Top-``k`` singular triplets of every selected base weight, streamed one at a time.

    All ``min(out, in)`` of them (which exact intruder counts need) with ``k=None``, and
    for every weight whose smaller side is at most ``full_up_to``: cheap and small for
    such weights, hours of CPU and gigabytes for a multi-billion-parameter model's.

    Selected: every 2-D ``*.weight`` whose module name equals one of the given
    names or ends with ``.<suffix>`` (e.g. ``"q_proj"``). ``fan_in_fan_out=True``
    says the weights are stored ``in × out`` (GPT-2 ``Conv1D``); they are transposed
    so the result is always ``out × in``. ``device=None`` uses CUDA when present.
    """
    selectors = list(module_names_or_suffixes)
    model = SafetensorsModel(model_dir)
    names = [n for n in model.matrix_modules() if _matches(n, selectors)]
    if not names:
        raise ValueError(f"no 2-D weights in {model_dir} match {selectors}")
    spectra = {}
    for name in names:
        W = model.load(name)
        if fan_in_fan_out:
            W = W.T
        n_triplets = min(W.shape) if k is None or min(W.shape) <= full_up_to else k
        spectra[name] = BaseModuleSpectrum(*top_k_svd(W, n_triplets, device=device))
    return spectra


def save_base_spectrum(spectra: Mapping[str, BaseModuleSpectrum], path: str | Path) -> None:
    """Write all spectra to one safetensors file: keys ``<module>.U``, ``.S``, ``.Vh``."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, spec in spectra.items():
        tensors[f"{name}.U"] = np.ascontiguousarray(spec.U, dtype=np.float64)
        tensors[f"{name}.S"] = np.ascontiguousarray(spec.S, dtype=np.float64)
        tensors[f"{name}.Vh"] = np.ascontiguousarray(spec.Vh, dtype=np.float64)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": _SPECTRUM_FORMAT, "orientation": "out_x_in"})


def load_base_spectrum(path: str | Path) -> dict[str, BaseModuleSpectrum]:
    """Read a file written by ``save_base_spectrum``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base spectrum file not found: {path}")
    parts: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(path), framework="np") as f:
        for key in f.keys():
            name, _, part = key.rpartition(".")
            parts.setdefault(name, {})[part] = f.get_tensor(key)
    return {n: BaseModuleSpectrum(p["U"], p["S"], p["Vh"]) for n, p in parts.items()}
