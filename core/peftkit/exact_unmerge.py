"""Unmerging that gives the base weight back bit for bit, for less than one extra byte per weight element.

In floating point, rounding makes ``(W + ΔW) − ΔW`` differ from ``W`` by a unit in the last place here
and there, and in bf16 a merge → unmerge cycle drifts visibly. At merge time the layer computes what
unmerging will give, ``W'``, and keeps per element the distance from ``W'`` to ``W`` counted in
representable values (the difference of their bit patterns): a signed 4-bit step, two to a byte.
Unmerging adds it back. The few elements whose distance does not fit in -7..7 (where the delta dwarfs
the weight) are kept whole, with their index, on the side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BITS = {2: torch.int16, 4: torch.int32}
_WIDE = {2: torch.int32, 4: torch.int64}  # holds a difference of two bit patterns without overflow
_REACH = 7  # the largest step a 4-bit residual holds


@dataclass
class MergeResidual:
    """What turns the unmerged weight back into the weight that was there before the merge."""

    steps: torch.Tensor  # uint8, two 4-bit steps (W's bit pattern minus W''s, plus 8) per byte
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
    far = distance.abs() > _REACH
    far_index = far.flatten().nonzero().flatten()
    return MergeResidual(
        steps=_pack(distance.clamp_(-_REACH, _REACH).flatten() + 8),
        far_index=far_index.to(torch.int32 if original.numel() < 2**31 else torch.int64),
        far_bits=original.contiguous().view(bits).flatten()[far_index],
        version=version,
    )


def _pack(nibbles: torch.Tensor) -> torch.Tensor:
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.to(torch.uint8).view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=1).flatten()[:numel]


def restore(unmerged: torch.Tensor, kept: MergeResidual) -> torch.Tensor:
    """The original weight, from what unmerging computed and the residual kept at merge time."""
    bits, wide = _BITS[unmerged.element_size()], _WIDE[unmerged.element_size()]
    steps = _unpack(kept.steps, unmerged.numel()).to(wide).view(unmerged.shape) - 8
    patterns = (unmerged.contiguous().view(bits).to(wide) + steps).to(bits)
    patterns.view(-1)[kept.far_index.long()] = kept.far_bits
    return patterns.view(unmerged.dtype)
