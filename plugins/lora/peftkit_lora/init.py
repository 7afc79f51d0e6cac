"""Initialisations that start LoRA from the base weight: PiSSA, OLoRA and LoftQ.

PiSSA and OLoRA move the top rank-``r`` part of ``W`` into the adapter, ``s·B₀A₀``, and leave the
residual ``W − s·B₀A₀`` in the base layer, so a fresh adapter changes no output. LoftQ leaves a
quantized ``Q`` in the base layer and fits ``s·B₀A₀`` to what quantizing lost, ``W − Q``. All weights
are the ``(out, in)`` matrices of :func:`peftkit.plugins.read_weight`, computed in float32.
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


def loftq_factors(
    weight: torch.Tensor, r: int, scaling: float, bits: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al. 2023): alternate Q = dequant(quant(W − s·B₀A₀)) and s·B₀A₀ = the rank-r SVD of
    W − Q, starting from B₀A₀ = 0; returns ``(A₀, B₀, Q)``. From the SVD W − Q ≈ U_r S_r V_rᵀ,
    B₀ = U_r √S_r / s and A₀ = √S_r V_rᵀ, so that Q + s·B₀A₀ is the rank-r fit whatever the scale
    (PEFT leaves out the 1/s, which agrees where s = 1, its default r = lora_alpha = 8)."""
    quantized = _round_trip_nf4 if bits == 4 else _round_trip_int8
    low_rank = torch.zeros_like(weight)
    for _ in range(iterations):
        q = quantized(weight - low_rank)
        u, s, vh = torch.linalg.svd(weight - q, full_matrices=False)
        root = torch.sqrt(s[:r])
        b, a = u[:, :r] * root[None, :], root[:, None] * vh[:r]
        low_rank = b @ a
    return a.contiguous(), (b / scaling).contiguous(), q


def _bitsandbytes():
    from peftkit.merge_folder import without_bitsandbytes_kernel_notice

    try:
        with without_bitsandbytes_kernel_notice():  # its advice on an optional kernel, not about LoftQ
            import bitsandbytes
    except ImportError:
        raise ImportError(
            "init_lora_weights='loftq' quantizes with bitsandbytes, which is not installed: "
            "pip install bitsandbytes (or peftkit-bnb)"
        ) from None
    return bitsandbytes.functional


def _round_trip_nf4(weight: torch.Tensor) -> torch.Tensor:
    """W as a 4-bit NF4 layer holds it (bitsandbytes' blocks of 64, absmax kept in float32): loading the
    result in 4-bit with the same settings gives it back exactly."""
    functional = _bitsandbytes()
    packed, state = functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=False, quant_type="nf4"
    )
    return functional.dequantize_4bit(packed, state).to(weight.dtype)


def _round_trip_int8(weight: torch.Tensor) -> torch.Tensor:
    """W as an 8-bit layer holds it: int8 rows scaled by each row's absmax (LLM.int8() without outliers),
    quantized from float16 as bitsandbytes' ``Int8Params`` quantizes."""
    functional = _bitsandbytes()
    codes, row_scales, _ = functional.int8_vectorwise_quant(weight.to(torch.float16))
    return functional.int8_vectorwise_dequant(codes, row_scales).to(weight.dtype)


def uses_base_weight(init: object) -> bool:
    """True for the inits that rewrite the base weight (PiSSA, OLoRA, LoftQ)."""
    return isinstance(init, str) and (
        init in ("pissa", "olora", "loftq") or PISSA_NITER.fullmatch(init) is not None
    )
