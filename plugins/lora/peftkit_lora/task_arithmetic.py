"""Ways to combine same-shaped tensors of several adapters into one: the task-arithmetic family.

- ``linear``: Σ wᵢ tᵢ (Ilharco et al. 2023, task arithmetic).
- ``magnitude_prune``: each tᵢ keeps its ``density`` fraction of largest-magnitude entries, then Σ wᵢ tᵢ.
- ``ties`` (Yadav et al. 2023): magnitude pruning, then per entry a majority sign is elected, and the
  weighted entries that agree with it are averaged.
- ``dare_linear``, ``dare_ties`` (Yu et al. 2024): as ``linear`` and ``ties``, but pruning drops entries
  at random (keeping each with probability ``density``) and rescales the kept ones by 1/density.

The majority sign is that of Σ tᵢ (``"total"``) or of Σ sign(tᵢ) (``"frequency"``), a tie counting as
positive; it is elected on the pruned, unweighted tensors, as PEFT does.
"""

from __future__ import annotations

import torch

KINDS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density · numel)`` entries of largest magnitude."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[tensor.abs().flatten().topk(keep).indices] = 1
    return tensor * mask.view_as(tensor)


def random_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each entry with probability ``density`` and divide the kept ones by it (DARE's rescaling)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry, which of the stacked tensors agree with the elected sign."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def combine(
    kind: str,
    tensors: list[torch.Tensor],
    weights: list[float],
    density: float = 1.0,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """One tensor from several by the rule ``kind`` (see the module docstring)."""
    if kind in ("magnitude_prune", "ties"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [random_prune(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(
        -1, *([1] * (stacked.dim() - 1))
    )
    if kind in ("ties", "dare_ties"):
        agree = majority_sign_mask(stacked, majority_sign_method)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return weighted.sum(dim=0)
