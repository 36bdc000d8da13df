"""Exact SVDs of LoRA updates and top singular triplets of (updated) base weights.

``lora_svd`` gets the singular triplets of ``ΔW = scale · B @ A`` from QR
factorisations of the two thin factors plus an ``r × r`` SVD, never forming the
dense ``ΔW``. ``top_k_svd`` gets the top triplets of ``W`` or ``W + ΔW`` with ARPACK
on a ``LinearOperator`` (an exact dense SVD for small matrices, or float64
``torch.linalg.svd`` on CUDA). All matrices are ``out × in``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FULL_SVD_MAX_DIM = 256

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
