"""OFTConfig: PEFT 0.21's OFT fields, names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit.config import (
    PeftConfig,
    check_choice,
    check_layer_selection,
    check_positive_int,
    check_probability,
    check_str_list,
    fail,
)

# the PEFT release whose OFT parameterisation (and Cayley-Neumann series) peftkit-oft reads and writes
PEFT_FORMAT_VERSION = "0.21.0"


@dataclass
class OFTConfig(PeftConfig):
    """OFT: each targeted layer's input is rotated by a learned block-diagonal orthogonal matrix ``R``.

    The blocks are sized by exactly one of ``oft_block_size`` (the size of each block) and ``r`` (the
    number of blocks); the other must be 0. Each block is the Cayley transform of a skew-symmetric
    matrix whose upper triangle is trained; ``use_cayley_neumann`` replaces the exact inverse by
    ``num_cayley_neumann_terms`` terms of its Neumann series (cheaper, only close to orthogonal).
    ``coft`` (constrained OFT) keeps each skew-symmetric block within Frobenius distance ``eps`` of 0;
    ``block_share`` trains one block shared by all. ``module_dropout`` is kept for PEFT's format: PEFT
    0.21 builds its dropout module but never applies it in forward, and neither does peftkit.
    """

    method: ClassVar[str] = "oft"
    # PEFT 0.21's OFTConfig has no field beyond the ones below and PeftConfig's.
    peft_only_fields: ClassVar[dict[str, Any]] = {}

    peft_type: str = "OFT"
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            check_str_list(self, name, allow_str=True)
        check_positive_int(self, "r", allow_zero=True)
        check_positive_int(self, "oft_block_size", allow_zero=True)
        check_probability(self, "module_dropout")
        check_choice(self, "bias", ("none", "all", "oft_only"))
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise fail(self, "eps", self.eps, "a number > 0 (the largest Frobenius norm of a COFT block)")
        check_positive_int(self, "num_cayley_neumann_terms")
        check_layer_selection(self)
        self._check_block_sizing()

    def to_dict(self) -> dict[str, Any]:
        # PEFT 0.21 warns that a Neumann adapter with no peft_version (or one below 0.18) uses the older
        # series; peftkit's is the current one, so the file says so.
        return {**super().to_dict(), "peft_version": PEFT_FORMAT_VERSION}

    def _check_block_sizing(self) -> None:
        """PEFT's rule: r x oft_block_size = in_features, so exactly one of them is given (non-zero)."""
        if self.r == 0 and self.oft_block_size == 0:
            raise fail(
                self,
                "oft_block_size",
                self.oft_block_size,
                "non-zero when r is 0 (give exactly one of r, the number of blocks, and oft_block_size, "
                "the size of a block)",
            )
        if self.r != 0 and self.oft_block_size != 0:
            raise fail(
                self,
                "r",
                self.r,
                f"0 when oft_block_size is non-zero ({self.oft_block_size}): give exactly one of r and "
                "oft_block_size, as r x oft_block_size = in_features (e.g. r=4, oft_block_size=0)",
            )
