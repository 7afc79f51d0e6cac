"""BOFT's orthogonal matrix ``M``: a butterfly product of permuted block-diagonal Cayley rotations.

The stored ``boft_R`` has shape ``(factors, blocks, b, b)`` and holds any real matrices ``A``. Each gives
a skew-symmetric ``S = (A - Aᵀ) / 2`` and the orthogonal Cayley block ``Q = (I - S)(I + S)⁻¹``
(``A = 0`` gives ``Q = I``). Factor ``i`` is ``Mᵢ = Pᵢ diag(Qᵢ₁, …, Qᵢ_blocks) Pᵢᵀ``, where ``Pᵢ`` is the
butterfly permutation of level ``i``: the features are cut into chunks of ``b · 2ⁱ`` and each chunk's
half blocks (``b / 2`` features) are reordered, those at even positions first, then those at odd
positions (``P₀ = I``). So factor ``i`` mixes features ``b · 2ⁱ⁻¹`` apart, and ``M = M_{N-1} ⋯ M₁ M₀``
with ``N = boft_n_butterfly_factor`` reaches across ``b · 2ᴺ⁻¹`` features with ``N · n · b`` parameters.

The layer computes ``x M`` factor by factor, as reshapes and small block products: ``M`` is formed as
a dense matrix only to merge it into a weight.
"""

from __future__ import annotations

import torch


def rotations(raw: torch.Tensor) -> torch.Tensor:
    """The Cayley blocks ``Q`` of ``boft_R`` (any shape ``(..., b, b)``), in at least float32."""
    compute = torch.promote_types(raw.dtype, torch.float32)  # CPUs have no half-precision solve
    a = raw.to(compute)
    skew = 0.5 * (a - a.transpose(-2, -1))
    eye = torch.eye(a.shape[-1], device=a.device, dtype=compute).expand_as(a)
    # Q (I + S) = I - S
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's multiplicative dropout: in one factor drawn at random, ``int(p · blocks)`` blocks drawn at
    random become the identity. Drawn with tensor ops only, so a compiled step has no graph break."""
    factors, count, size, _ = blocks.shape
    dropped = int(p * count)
    if dropped == 0:
        return blocks
    factor = torch.randint(0, factors, (1,), device=blocks.device)
    in_factor = torch.rand(count, device=blocks.device).argsort() < dropped  # exactly `dropped` of them
    mask = (torch.arange(factors, device=blocks.device)[:, None] == factor) & in_factor[None, :]
    eye = torch.eye(size, device=blocks.device, dtype=blocks.dtype)
    return torch.where(mask[..., None, None], eye, blocks)


def _by_half_blocks(x: torch.Tensor, level: int, block_size: int) -> torch.Tensor:
    """``x``'s last dimension as ``(chunks, 2ⁱ, 2, b / 2)``: each chunk's half blocks, paired up."""
    half = block_size // 2
    return x.reshape(*x.shape[:-1], -1, 2**level, 2, half)


def permute(x: torch.Tensor, level: int, block_size: int) -> torch.Tensor:
    """``x Pᵢᵀ`` (each chunk's even half blocks, then its odd ones) on the last dimension."""
    if level == 0:
        return x
    return _by_half_blocks(x, level, block_size).transpose(-3, -2).reshape(x.shape)


def unpermute(x: torch.Tensor, level: int, block_size: int) -> torch.Tensor:
    """``x Pᵢ``, the inverse of :func:`permute`."""
    if level == 0:
        return x
    half = block_size // 2
    paired = x.reshape(*x.shape[:-1], -1, 2, 2**level, half)
    return paired.transpose(-3, -2).reshape(x.shape)


def block_product(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x diag(blocks)`` on the last dimension, ``blocks`` of shape ``(count, b, b)``."""
    count, size, _ = blocks.shape
    grouped = x.reshape(*x.shape[:-1], count, size)
    return torch.einsum("...rk,rkc->...rc", grouped, blocks).reshape(x.shape)


def turn(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x M`` for the Cayley blocks of every factor, ``(factors, count, b, b)``: ``x M_{N-1}`` first."""
    size = blocks.shape[-1]
    for level in reversed(range(blocks.shape[0])):
        x = permute(block_product(unpermute(x, level, size), blocks[level]), level, size)
    return x


def butterfly_matrix(blocks: torch.Tensor) -> torch.Tensor:
    """The dense ``M``, ``(n, n)``, as :func:`turn` applies it (``I M``)."""
    features = blocks.shape[1] * blocks.shape[-1]
    return turn(torch.eye(features, device=blocks.device, dtype=blocks.dtype), blocks)
