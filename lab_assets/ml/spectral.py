"""Spectra of LoRA updates and of their relation to the base weights.

The experiment asks whether fine-tuning methods and tasks leave distinguishable
fingerprints in the geometry of the weight updates. Everything it measures is
computed here, with three rules that keep it exact and cheap at 3B-model scale:

* The singular values of ``ΔW = scale · B @ A`` come from QR factorisations of
  the two thin factors plus an ``r × r`` SVD (``lora_svd``); the dense ``ΔW`` is
  never formed, so this is exact and costs ``O((out + in) r²)``.
* Top singular triplets of a base weight ``W`` or of ``W + ΔW`` come from
  ``scipy.sparse.linalg.svds`` (ARPACK, tolerance 0 = machine precision), with
  ``W + ΔW`` applied as a ``LinearOperator`` (``x ↦ W x + scale · B (A x)``), never
  a dense SVD of a big matrix. When the smaller side is at most
  ``FULL_SVD_MAX_DIM`` (256) an exact dense SVD is used instead: at that size it is
  faster than ARPACK's start-up and just as exact. On a CUDA device the dense
  SVD runs in float64 with ``torch.linalg.svd``, which is exact and fast there.
* Base weights are streamed one module at a time from the model's safetensors
  files (``safe_open`` is mmapped; sharded checkpoints are followed through
  ``model.safetensors.index.json``).

All matrices here use the ``nn.Linear`` orientation, ``out × in``. A weight stored
``in × out`` (GPT-2 ``Conv1D``, adapters with ``fan_in_fan_out``) is transposed
when it is read for a module, so base and update vectors live in the same spaces.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lab_assets.ml.adapter_io import LoraModule, iter_lora_modules

DEFAULT_TOP_K = 16
FULL_SVD_MAX_DIM = 256
INTRUDER_THRESHOLD = 0.5
_SPECTRUM_FORMAT = "lab-base-spectrum-v1"

# Column order of ``adapter_spectrum``: the contract columns first.
SPECTRUM_COLUMNS = [
    "module",
    "singular_values",
    "rank",
    "alpha",
    "scale",
    "out_features",
    "in_features",
    "fan_in_fan_out",
    "fro_norm",
    "spectral_norm",
    "stable_rank",
    "effective_rank",
    "base_k",
    "subspace_overlap",
    "subspace_overlap_right",
    "subspace_overlap_chance",
    "subspace_overlap_right_chance",
    "intruder_dims",
    "intruder_dims_right",
    "top_sv_shift",
    "top_sv_shifts",
]
_LIST_COLUMNS = ("singular_values", "top_sv_shifts")


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


# --------------------------------------------------------------------------- SVDs


_THREADPOOLS: Any = None


def _one_blas_thread() -> Any:
    """Context limiting BLAS/OpenMP to one thread.

    QR of a tall ``n × r`` factor is too small to share: with two threads on a
    busy machine it ran 3-10× slower and erratically, single-threaded it is steady.
    """
    global _THREADPOOLS
    if _THREADPOOLS is None:
        from threadpoolctl import ThreadpoolController

        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS.limit(limits=1)


def _check_factors(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"expected A (r × in) and B (out × r), got {A.shape} and {B.shape}")
    return A, B


def lora_svd(
    A: np.ndarray, B: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact thin SVD of ``ΔW = scale · B @ A`` without forming ``ΔW``.

    With ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, ``ΔW = Q_B (scale R_B R_Aᵀ) Q_Aᵀ``,
    so the SVD of the small core gives ``ΔW``'s. Returns ``U`` (out × m), ``S`` (m,
    descending) and ``Vh`` (m × in) with ``m = min(r, out, in)`` — all r values for
    any real LoRA, whose rank is below both sides.
    """
    A, B = _check_factors(A, B)
    with _one_blas_thread():
        q_b, r_b = np.linalg.qr(B)
        q_a, r_a = np.linalg.qr(A.T)
        u, s, vh = np.linalg.svd(float(scale) * (r_b @ r_a.T), full_matrices=False)
        return q_b @ u, s, vh @ q_a.T


def lora_singular_values(A: np.ndarray, B: np.ndarray, scale: float) -> np.ndarray:
    """The singular values of ``lora_svd`` alone (descending), skipping the Q factors: ~3× cheaper."""
    A, B = _check_factors(A, B)
    with _one_blas_thread():
        r_b = np.linalg.qr(B, mode="r")
        r_a = np.linalg.qr(A.T, mode="r")
        return np.linalg.svd(float(scale) * (r_b @ r_a.T), compute_uv=False)


def _resolve_device(device: str | None) -> str:
    if device is not None:
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a project dependency
        return "cpu"


def top_k_svd(
    W: np.ndarray,
    k: int,
    lora: tuple[np.ndarray, np.ndarray, float] | None = None,
    *,
    device: str | None = None,
    full_svd_max_dim: int = FULL_SVD_MAX_DIM,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` singular triplets of ``W`` (``out × in``), or of ``W + scale·B@A`` with ``lora``.

    Exact dense SVD when ``min(W.shape) <= full_svd_max_dim`` (or ``k`` is within one
    of it, where ARPACK cannot run) or on CUDA (float64 ``torch.linalg.svd``);
    otherwise ARPACK ``svds`` with tolerance 0 on a ``LinearOperator``, so the
    dense ``W + ΔW`` is never decomposed. Deterministic start vector. Returns
    ``U`` (out × k), ``S`` (k, descending), ``Vh`` (k × in).
    """
    W = np.asarray(W, dtype=np.float64)
    m, n = W.shape
    k = int(min(k, m, n))
    if k < 1:
        raise ValueError("k must be at least 1")
    device = _resolve_device(device)

    if device.startswith("cuda"):
        import torch

        dense = torch.as_tensor(W, device=device)
        if lora is not None:
            A, B, scale = lora
            dense = dense + float(scale) * (
                torch.as_tensor(B, device=device) @ torch.as_tensor(A, device=device)
            )
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        return u[:, :k].cpu().numpy(), s[:k].cpu().numpy(), vh[:k].cpu().numpy()

    if min(m, n) <= full_svd_max_dim or k >= min(m, n) - 1:
        dense = W if lora is None else W + float(lora[2]) * (lora[1] @ lora[0])
        u, s, vh = np.linalg.svd(dense, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]

    from scipy.sparse.linalg import LinearOperator, svds

    if lora is None:
        op: Any = W
    else:
        A, B, scale = (np.asarray(lora[0], np.float64), np.asarray(lora[1], np.float64), lora[2])
        sB = float(scale) * B
        op = LinearOperator(
            (m, n),
            matvec=lambda x: W @ x + sB @ (A @ x),
            rmatvec=lambda y: W.T @ y + A.T @ (sB.T @ y),
            matmat=lambda X: W @ X + sB @ (A @ X),
            rmatmat=lambda Y: W.T @ Y + A.T @ (sB.T @ Y),
            dtype=np.float64,
        )
    v0 = np.random.default_rng(0).standard_normal(min(m, n))
    u, s, vh = svds(op, k=k, tol=0, v0=v0, which="LM")
    order = np.argsort(s)[::-1]
    return u[:, order], s[order], vh[order]


# ---------------------------------------------------------------- base weights


class _SafetensorsModel:
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
    return _SafetensorsModel(model_dir).load(module_name)


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
    k: int = DEFAULT_TOP_K,
    *,
    fan_in_fan_out: bool = False,
    device: str | None = None,
) -> dict[str, BaseModuleSpectrum]:
    """Top-``k`` singular triplets of every selected base weight, streamed one at a time.

    Selected: every 2-D ``*.weight`` whose module name equals one of the given
    names or ends with ``.<suffix>`` (e.g. ``"q_proj"``). ``fan_in_fan_out=True``
    says the weights are stored ``in × out`` (GPT-2 ``Conv1D``); they are transposed
    so the result is always ``out × in``. ``device=None`` uses CUDA when present.
    """
    selectors = list(module_names_or_suffixes)
    model = _SafetensorsModel(model_dir)
    names = [n for n in model.matrix_modules() if _matches(n, selectors)]
    if not names:
        raise ValueError(f"no 2-D weights in {model_dir} match {selectors}")
    spectra = {}
    for name in names:
        W = model.load(name)
        if fan_in_fan_out:
            W = W.T
        spectra[name] = BaseModuleSpectrum(*top_k_svd(W, k, device=device))
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


# -------------------------------------------------------------------- features


def effective_rank(singular_values: np.ndarray) -> float:
    """Roy & Vetterli (2007): ``exp(H(p))`` with ``p = s / Σ s``; NaN when all s are 0."""
    s = np.asarray(singular_values, dtype=np.float64)
    total = s.sum()
    if total <= 0:
        return math.nan
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def module_features(
    mod: LoraModule,
    base: BaseModuleSpectrum | None,
    W: np.ndarray | None = None,
    *,
    k: int | None = None,
    intruder_threshold: float = INTRUDER_THRESHOLD,
    device: str | None = None,
) -> dict[str, Any]:
    """Spectral features of one module's ``ΔW``, and of its relation to the base.

    Always: ``singular_values`` (all of ΔW's, descending), ``fro_norm``,
    ``spectral_norm``, ``stable_rank`` (fro² / spec²), ``effective_rank``
    (Roy & Vetterli), ``rank``, ``alpha``, ``scale``, ``out_features``,
    ``in_features``. Scale-free ratios are NaN for an all-zero update.

    With a base spectrum (top-k of ``W``; computed from ``W`` if only ``W`` is
    given, with ``k`` or ``DEFAULT_TOP_K``):

    * ``subspace_overlap``: ``‖U_baseᵀ U_ΔW‖_F² / q`` — mean squared cosine between
      ΔW's top-q left singular subspace (``q = min(r, k)``) and the base's top-k
      one; ``subspace_overlap_right`` likewise with right singular vectors;
      ``*_chance`` is the expectation for a random subspace (k / dimension).

    With ``W`` too (``out × in``, already oriented):

    * ``intruder_dims``: how many of the top-k left singular vectors of ``W + ΔW``
      have max |cosine| below ``intruder_threshold`` with the base's top-k left
      singular vectors (``intruder_dims_right``: right vectors). Following
      Shuttleworth et al., "LoRA vs Full Fine-Tuning: An Illusion of Equivalence",
      but compared against the base's top-k vectors only, not all of them, so a
      top vector of ``W + ΔW`` that aligns with a base vector beyond the k-th
      also counts as an intruder.
    * ``top_sv_shift``: ``(σ₁(W+ΔW) − σ₁(W)) / σ₁(W)``; ``top_sv_shifts`` the same
      for each of the top k.
    """
    if base is None and W is None:
        U = Vh = None
        S = lora_singular_values(mod.A, mod.B, mod.scale)
    else:
        U, S, Vh = lora_svd(mod.A, mod.B, mod.scale)
    fro = float(np.sqrt(np.sum(S**2)))
    spec = float(S[0]) if S.size else 0.0
    out: dict[str, Any] = {
        "singular_values": [float(x) for x in S],
        "rank": int(mod.rank),
        "alpha": float(mod.alpha),
        "scale": float(mod.scale),
        "out_features": mod.out_features,
        "in_features": mod.in_features,
        "fan_in_fan_out": bool(mod.fan_in_fan_out),
        "fro_norm": fro,
        "spectral_norm": spec,
        "stable_rank": fro**2 / spec**2 if spec > 0 else math.nan,
        "effective_rank": effective_rank(S),
        "base_k": math.nan,
        "subspace_overlap": math.nan,
        "subspace_overlap_right": math.nan,
        "subspace_overlap_chance": math.nan,
        "subspace_overlap_right_chance": math.nan,
        "intruder_dims": math.nan,
        "intruder_dims_right": math.nan,
        "top_sv_shift": math.nan,
        "top_sv_shifts": None,
    }
    if W is not None:
        W = np.asarray(W, dtype=np.float64)
        if W.shape != (mod.out_features, mod.in_features):
            raise ValueError(
                f"{mod.name}: base weight {W.shape} is not out × in "
                f"({mod.out_features}, {mod.in_features}); orient it first (orient_weight)"
            )
        if base is None:
            base = BaseModuleSpectrum(*top_k_svd(W, k or DEFAULT_TOP_K, device=device))
    if base is None:
        return out
    if k is not None and k < base.k:
        base = base.truncated(k)
    if base.U.shape[0] != mod.out_features or base.Vh.shape[1] != mod.in_features:
        raise ValueError(
            f"{mod.name}: base spectrum is {base.U.shape[0]} × {base.Vh.shape[1]}, "
            f"the update is {mod.out_features} × {mod.in_features} (out × in)"
        )
    kb = base.k
    out["base_k"] = kb
    out["subspace_overlap_chance"] = kb / mod.out_features
    out["subspace_overlap_right_chance"] = kb / mod.in_features
    if spec > 0 and U is not None and Vh is not None:
        q = min(mod.rank, kb, S.size)
        out["subspace_overlap"] = float(np.sum((base.U.T @ U[:, :q]) ** 2) / q)
        out["subspace_overlap_right"] = float(np.sum((base.Vh @ Vh[:q].T) ** 2) / q)
    if W is not None:
        u_ft, s_ft, vh_ft = top_k_svd(W, kb, (mod.A, mod.B, mod.scale), device=device)
        max_cos_left = np.abs(base.U.T @ u_ft).max(axis=0)
        max_cos_right = np.abs(base.Vh @ vh_ft.T).max(axis=0)
        out["intruder_dims"] = int(np.sum(max_cos_left < intruder_threshold))
        out["intruder_dims_right"] = int(np.sum(max_cos_right < intruder_threshold))
        with np.errstate(divide="ignore", invalid="ignore"):
            shifts = (s_ft - base.S) / base.S
        out["top_sv_shift"] = float(shifts[0])
        out["top_sv_shifts"] = [float(x) for x in shifts]
    return out


def adapter_spectrum(
    adapter_dir: str | Path,
    base_dir: str | Path | None = None,
    base_spectrum: Mapping[str, BaseModuleSpectrum] | None = None,
    top_k: int | None = None,
    *,
    intruder_threshold: float = INTRUDER_THRESHOLD,
    device: str | None = None,
) -> pd.DataFrame:
    """One row per adapted module: ``module``, ``singular_values`` and ``module_features``.

    Without a base the base-relative columns are NaN (``top_sv_shifts`` None); with
    only ``base_spectrum`` the subspace overlaps are filled; with ``base_dir`` every
    column is (the base spectrum of just the adapted modules is computed from the
    streamed weights when ``base_spectrum`` is not given; ``top_k`` defaults to
    ``DEFAULT_TOP_K`` there and truncates a given spectrum otherwise).
    """
    modules = iter_lora_modules(adapter_dir)
    base_model = _SafetensorsModel(base_dir) if base_dir is not None else None
    k = top_k if top_k is not None else (None if base_spectrum is not None else DEFAULT_TOP_K)
    rows = []
    for mod in modules:
        base = None
        if base_spectrum is not None:
            if mod.name not in base_spectrum:
                raise KeyError(f"base spectrum has no entry for module {mod.name!r}")
            base = base_spectrum[mod.name]
        W = None
        if base_model is not None:
            W = orient_weight(
                base_model.load(mod.name), mod.out_features, mod.in_features, mod.fan_in_fan_out
            )
        feats = module_features(
            mod, base, W, k=k, intruder_threshold=intruder_threshold, device=device
        )
        rows.append({"module": mod.name, **feats})
    return pd.DataFrame(rows, columns=SPECTRUM_COLUMNS)


def write_spectrum_parquet(df: pd.DataFrame, path: str | Path) -> None:
    """Write an ``adapter_spectrum`` frame; list columns are typed ``list<double>``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    for col in _LIST_COLUMNS:
        if col in table.column_names:
            i = table.column_names.index(col)
            field = pa.field(col, pa.list_(pa.float64()))
            table = table.set_column(i, field, table.column(col).cast(field.type))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path))
