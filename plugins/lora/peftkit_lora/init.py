"""Initialisations that start LoRA from the base weight: PiSSA and OLoRA.

Both move the top rank-``r`` part of ``W`` into the adapter, ``s·B₀A₀``, and leave the residual
``W − s·B₀A₀`` in the base layer, so a fresh adapter changes no output. All weights are the
``(out, in)`` matrices of :func:`peftkit.plugins.read_weight`, computed in float32.
"""

from __future__ import annotations

import torch

from peftkit_lora.config import PISSA_NITER


def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float, init: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al. 2024): from the SVD W = U S Vᵀ, B₀ = U_r √(S_r/s) and A₀ = √(S_r/s) V_rᵀ.

    ``"pissa"`` takes an exact SVD; ``"pissa_niter_N"`` a randomized one with N subspace iterations
    (Halko et al.), much faster on large weights and close to exact for the top singular values.
    """
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        niter = int(PISSA_NITER.fullmatch(init).group(1))
        u, s, v = torch.svd_lowrank(weight, r, niter=niter)
        vh = v.T
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz 2024): from the QR decomposition W = QR, B₀ = Q[:, :r] and A₀ = R[:r]."""
    q, upper = torch.linalg.qr(weight)
    return upper[:r].contiguous(), q[:, :r].contiguous()


def uses_base_weight(init: object) -> bool:
    """True for the inits that rewrite the base weight (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init in ("pissa", "olora") or PISSA_NITER.fullmatch(init) is not None)
