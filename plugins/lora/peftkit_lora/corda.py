"""CorDA, Context-oriented Decomposition Adaptation (Yang et al. 2024, arXiv:2406.05223): the math.

A LoRA layer ``y = W x + s·B A x`` (``W``: out × in). CorDA orients the SVD of ``W`` by what the layer
reads on task data. With ``X`` the layer's inputs (rows: tokens), each call's rows scaled by ``1/|max X|``
(PEFT's normalisation), the covariance is ``C = (1/n) Σ_calls XᵀX`` (in × in, over the ``n`` forward
calls). ``C`` is damped until it inverts well: ``C' = C + λ·mean(diag C)·I``, ``λ`` from 0.01, doubled
until ``‖C' C'⁻¹ − I‖_F < 0.05``. Then, from the SVD ``W C' = U S Vᵀ``::

    W = U S Vᵀ C'⁻¹ = Σ_i  u_i s_i (C'⁻ᵀ v_i)ᵀ

and the adapter takes ``r`` of these components, the base layer keeping the rest, ``W − s·B A``:

- ``"ipm"`` (instruction-previewed): the top ``r`` (largest ``s_i``), so training starts on what the
  task's inputs use most;
- ``"kpm"`` (knowledge-preserved): the bottom ``r``, so what the data (e.g. questions whose answers the
  model must keep knowing) uses most stays frozen in the base.

With ``S_r`` the chosen values over the scale, ``A = √(S_r/s) · (Vᵀ C'⁻¹)_r`` and ``B = U_r √(S_r/s)``,
so ``s·B A`` is those components exactly and the model's outputs do not change at init.
"""

from __future__ import annotations

import torch

METHODS = ("ipm", "kpm")
INVERSE_TOLERANCE = 0.05  # ‖C' C'⁻¹ − I‖_F below which the damped covariance counts as well inverted
FIRST_DAMPING = 0.01


class Covariance:
    """The running ``Σ XᵀX`` of a layer's inputs, one term per forward call, each call's rows scaled by
    ``1/|max X|``; :meth:`mean` divides by the number of calls (PEFT's "sample count")."""

    def __init__(self, keep_dtype: bool = False) -> None:
        self.keep_dtype = keep_dtype  # PEFT's use_float16_for_covariance: no upcast to float32
        self.total: torch.Tensor | None = None
        self.calls = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        if not self.keep_dtype:
            rows = rows.float()
        rows = rows / rows.max().abs()
        if not torch.isfinite(rows).all():
            raise ValueError(
                "CorDA read a non-finite layer input (NaN or inf, or an input whose largest entry is 0): "
                "check the calibration data"
            )
        term = rows.T @ rows
        self.total = term if self.total is None else self.total + term
        self.calls += 1

    def mean(self) -> torch.Tensor:
        return self.total / self.calls


def damped_inverse(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C', C'⁻¹)``: ``C`` plus ``λ·mean(diag C)·I``, with ``λ`` doubled from 0.01 until the inverse
    is good to ``‖C' C'⁻¹ − I‖_F < 0.05``."""
    covariance = covariance.float()
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    scale = covariance.diagonal().mean()
    damping = FIRST_DAMPING
    while True:
        damped = covariance + eye * scale * damping
        inverse = torch.linalg.inv(damped)
        if float(torch.dist(damped @ inverse, eye)) < INVERSE_TOLERANCE:
            return damped, inverse
        damping *= 2


def corda_components(
    weight: torch.Tensor, covariance: torch.Tensor, r: int, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S_r, V_r)`` with ``W ≈ Σ`` over the chosen ``r`` components ``U_r diag(S_r) V_rᵀ``:
    the SVD ``W C' = U S Vᵀ``, ``V = (Vᵀ C'⁻¹)ᵀ``; the top ``r`` for ``"ipm"``, the bottom ``r`` for
    ``"kpm"`` (both in descending order). ``weight`` is ``(out, in)``."""
    if method not in METHODS:
        raise ValueError(f"corda_method must be 'ipm' or 'kpm', got {method!r}")
    damped, inverse = damped_inverse(covariance)
    u, s, vh = torch.linalg.svd(weight.float() @ damped, full_matrices=False)
    v = (vh @ inverse).T
    chosen = slice(0, r) if method == "ipm" else slice(s.shape[0] - r, s.shape[0])
    return u[:, chosen], s[chosen], v[:, chosen]


def corda_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``s·B A = U_r diag(S_r) V_rᵀ``: ``A = √(S_r/s) V_rᵀ``, ``B = U_r √(S_r/s)``."""
    root = torch.sqrt(s / scaling)
    return (root[:, None] * v.T).contiguous(), (u * root[None, :]).contiguous()
