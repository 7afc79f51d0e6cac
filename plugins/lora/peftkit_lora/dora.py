"""DoRA (Liu et al. 2024): W' = m · (W + s·BA) / ‖W + s·BA‖, one norm and one magnitude per output feature.

Everything here works on weights flattened to two dimensions, ``(out, K)``, where a row belongs to one
output feature: ``(out, in)`` for linear layers, ``(out, in · kernel)`` for convolutions, and the
transposed ``(dim, num_embeddings)`` for embeddings, whose output features are the embedding's columns.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def row_norms(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """‖W + s·BA‖ per row, without forming the dense ``(out, K)`` sum.

    ‖wᵢ + s·bᵢA‖² = ‖wᵢ‖² + 2s·bᵢ·(A wᵢ) + s²·bᵢ(AAᵀ)bᵢᵀ: the cross term is one ``(out, K) × (K, r)``
    product and the last one an ``r × r`` Gram matrix, so memory stays at ``out × r``. The norm is
    computed without gradients: DoRA's section 4.3 treats it as a constant in backpropagation.
    """
    w, a, b = weight.float(), lora_a.float(), lora_b.float()
    squared = torch.linalg.vector_norm(w, dim=1).square()
    squared += 2 * scaling * (b * (w @ a.T)).sum(dim=1)
    squared += scaling**2 * ((b @ (a @ a.T)) * b).sum(dim=1)
    return squared.clamp_min(0).sqrt()


def dense_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per row of an already combined weight (used where the dense weight exists anyway: merging)."""
    return torch.linalg.vector_norm(weight.float(), dim=1)
