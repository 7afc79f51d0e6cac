"""Unmerging that gives the base weight back bit for bit, for one extra byte per weight element.

In floating point, rounding makes ``(W + ΔW) − ΔW`` differ from ``W`` by a unit in the last place here
and there, and in bf16 a merge → unmerge cycle drifts visibly. At merge time the layer computes what
unmerging will give, ``W'``, and keeps per element the distance from ``W'`` to ``W`` counted in
representable values (the difference of their bit patterns), as one signed byte. Unmerging adds it back.
The rare element whose distance does not fit in a byte (a delta hundreds of times the weight) is kept
whole, with its index, on the side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BITS = {2: torch.int16, 4: torch.int32}
_WIDE = {2: torch.int32, 4: torch.int64}  # holds a difference of two bit patterns without overflow


@dataclass
class MergeResidual:
    """What turns the unmerged weight back into the weight that was there before the merge."""

    steps: torch.Tensor  # int8, the weight's shape: W's bit pattern minus W''s
    far_index: torch.Tensor  # flat indices of the elements whose distance does not fit in a byte
    far_bits: torch.Tensor  # their original bit patterns
    version: int  # the base weight's version counter right after the merge

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.steps, self.far_index, self.far_bits))


def supports(weight: torch.Tensor) -> bool:
    return weight.is_floating_point() and weight.element_size() in _BITS


def residual(original: torch.Tensor, unmerged: torch.Tensor, version: int) -> MergeResidual:
    """How far ``unmerged`` (what unmerging will compute) lands from ``original``, element by element."""
    bits, wide = _BITS[original.element_size()], _WIDE[original.element_size()]
    distance = original.contiguous().view(bits).to(wide) - unmerged.contiguous().view(bits).to(wide)
    far = (distance < -127) | (distance > 127)
    far_index = far.flatten().nonzero().flatten()
    return MergeResidual(
        steps=distance.clamp_(-127, 127).to(torch.int8),
        far_index=far_index,
            far_bits=original.contiguous().view(bits).flatten()[far_index],
        version=version,
    )


def restore(unmerged: torch.Tensor, kept: MergeResidual) -> torch.Tensor:
    """The original weight, from what unmerging computed and the residual kept at merge time."""
    bits, wide = _BITS[unmerged.element_size()], _WIDE[unmerged.element_size()]
    patterns = (unmerged.contiguous().view(bits).to(wide) + kept.steps.to(wide)).to(bits)
    patterns.view(-1)[kept.far_index] = kept.far_bits
    return patterns.view(unmerged.dtype)
