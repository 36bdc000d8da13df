"""Spectra of LoRA updates and of their relation to the base weights.

The experiment asks whether fine-tuning methods and tasks leave distinguishable
fingerprints in the geometry of the weight updates. Everything it measures is
computed here (with ``svd`` and ``base_weights``), by three rules that keep it exact
and cheap at 3B-model scale:

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

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lab_assets.ml.adapter_io import LoraModule, iter_lora_modules
from lab_assets.ml.base_weights import (
    DEFAULT_TOP_K,
    BaseModuleSpectrum,
    SafetensorsModel,
    compute_base_spectrum,
    load_base_spectrum,
    load_base_weight,
    orient_weight,
    save_base_spectrum,
)
from lab_assets.ml.svd import (
    FULL_SVD_MAX_DIM,
    lora_singular_values,
    lora_svd,
    top_k_svd,
)

# Shuttleworth et al. 2024's defaults: the top 10 singular vectors of W + ΔW, ε = 0.5.
INTRUDER_THRESHOLD = 0.5
INTRUDER_K = 10

# Re-exported: callers read spectra through this module.
__all__ = [
    "DEFAULT_TOP_K",
    "FULL_SVD_MAX_DIM",
    "INTRUDER_K",
    "INTRUDER_THRESHOLD",
    "SPECTRUM_COLUMNS",
    "BaseModuleSpectrum",
    "adapter_spectrum",
    "compute_base_spectrum",
    "effective_rank",
    "load_base_spectrum",
    "load_base_weight",
    "lora_singular_values",
    "lora_svd",
    "module_features",
    "orient_weight",
    "save_base_spectrum",
    "top_k_svd",
    "write_spectrum_parquet",
]

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
    "intruder_k",
    "intruder_base_vectors",
    "top_sv_shift",
    "top_sv_shifts",
]
_LIST_COLUMNS = ("singular_values", "top_sv_shifts")


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
    intruder_k: int = INTRUDER_K,
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

    The overlaps use the base's top ``k`` vectors (``k`` truncates ``base``).

    With ``W`` too (``out × in``, already oriented):

    * ``intruder_dims``: as in Shuttleworth et al. 2024, "LoRA vs Full Fine-Tuning:
      An Illusion of Equivalence": how many of the top ``intruder_k`` left singular
      vectors of ``W + ΔW`` have max |cosine| below ``intruder_threshold`` (ε) with
      *every* left singular vector of the base that ``base`` holds
      (``intruder_base_vectors`` of them: all ``min(out, in)`` when the stored
      spectrum is complete, which the ``base_spectrum`` asset's is by default);
      ``intruder_dims_right`` likewise with right vectors.
    * ``top_sv_shift``: ``(σ₁(W+ΔW) − σ₁(W)) / σ₁(W)``; ``top_sv_shifts`` the same
      for each of the top k.
    """
    if base is None and W is None:
        U = Vh = None
        S = lora_singular_values(mod.A, mod.B, mod.scale)
    else:
        U, S, Vh = lora_svd(mod.A, mod.B, mod.scale)
    out = _update_features(mod, S)
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
    base_all = base
    if k is not None and k < base.k:
        base = base.truncated(k)
    if base.U.shape[0] != mod.out_features or base.Vh.shape[1] != mod.in_features:
        raise ValueError(
            f"{mod.name}: base spectrum is {base.U.shape[0]} × {base.Vh.shape[1]}, "
            f"the update is {mod.out_features} × {mod.in_features} (out × in)"
        )
    out.update(_overlap_features(mod, base, U, S, Vh, out["spectral_norm"]))
    if W is not None:
        out.update(
            _intruder_features(mod, base, base_all, W, intruder_k, intruder_threshold, device)
        )
    return out


def _update_features(mod: LoraModule, S: np.ndarray) -> dict[str, Any]:
    """The columns that need only ΔW's singular values; base-relative ones start as NaN."""
    fro = float(np.sqrt(np.sum(S**2)))
    spec = float(S[0]) if S.size else 0.0
    return {
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
        "intruder_k": math.nan,
        "intruder_base_vectors": math.nan,
        "top_sv_shift": math.nan,
        "top_sv_shifts": None,
    }


def _overlap_features(
    mod: LoraModule,
    base: BaseModuleSpectrum,
    U: np.ndarray | None,
    S: np.ndarray,
    Vh: np.ndarray | None,
    spec: float,
) -> dict[str, Any]:
    """``base_k``, the subspace overlaps with the base's top-k and their chance levels."""
    kb = base.k
    out: dict[str, Any] = {
        "base_k": kb,
        "subspace_overlap_chance": kb / mod.out_features,
        "subspace_overlap_right_chance": kb / mod.in_features,
    }
    if spec > 0 and U is not None and Vh is not None:
        q = min(mod.rank, kb, S.size)
        out["subspace_overlap"] = float(np.sum((base.U.T @ U[:, :q]) ** 2) / q)
        out["subspace_overlap_right"] = float(np.sum((base.Vh @ Vh[:q].T) ** 2) / q)
    return out


def _intruder_features(
    mod: LoraModule,
    base: BaseModuleSpectrum,
    base_all: BaseModuleSpectrum,
    W: np.ndarray,
    intruder_k: int,
    intruder_threshold: float,
    device: str | None,
) -> dict[str, Any]:
    """Intruder dimensions of ``W + ΔW`` (against all of ``base_all``'s vectors) and the
    shifts of its top-k singular values (against ``base``, the top k)."""
    lora = (mod.A, mod.B, mod.scale)
    u_ft, s_ft, vh_ft = top_k_svd(W, max(base.k, intruder_k), lora, device=device)
    ki = min(intruder_k, s_ft.size)
    max_cos_left = np.abs(base_all.U.T @ u_ft[:, :ki]).max(axis=0)
    max_cos_right = np.abs(base_all.Vh @ vh_ft[:ki].T).max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        shifts = (s_ft[: base.k] - base.S) / base.S
    return {
        "intruder_dims": int(np.sum(max_cos_left < intruder_threshold)),
        "intruder_dims_right": int(np.sum(max_cos_right < intruder_threshold)),
        "intruder_k": int(ki),
        "intruder_base_vectors": int(base_all.k),
        "top_sv_shift": float(shifts[0]),
        "top_sv_shifts": [float(x) for x in shifts],
    }


def adapter_spectrum(
    adapter_dir: str | Path,
    base_dir: str | Path | None = None,
    base_spectrum: Mapping[str, BaseModuleSpectrum] | None = None,
    top_k: int | None = None,
    *,
    intruder_k: int = INTRUDER_K,
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
    base_model = SafetensorsModel(base_dir) if base_dir is not None else None
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
            mod,
            base,
            W,
            k=k,
            intruder_k=intruder_k,
            intruder_threshold=intruder_threshold,
            device=device,
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
