"""BOFTConfig: PEFT 0.21's BOFT fields, names, defaults and meaning."""

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


def largest_factor_for(block_num: int) -> int:
    """The largest ``boft_n_butterfly_factor`` a layer of ``block_num`` blocks takes: each factor after the
    first pairs up blocks, so ``2 ** (factor - 1)`` must divide ``block_num``."""
    factor = 1
    while block_num % 2**factor == 0:
        factor += 1
    return factor


@dataclass
class BOFTConfig(PeftConfig):
    """BOFT: each targeted layer's input is turned by a learned orthogonal ``M``, its output scaled by ``s``.

    ``M`` is the product of ``boft_n_butterfly_factor`` factors; each is a block-diagonal orthogonal
    matrix (Cayley transforms of skew-symmetric blocks) conjugated by a butterfly permutation, so that
    factor ``i`` mixes features ``boft_block_size x 2**i`` apart. With one factor BOFT is OFT with an
    output scale. The blocks are sized by exactly one of ``boft_block_size`` and ``boft_block_num`` (the
    other 0), as ``boft_block_size x boft_block_num = in_features``. ``boft_dropout`` replaces that share
    of one factor's blocks by the identity while training.
    """

    method: ClassVar[str] = "boft"
    # PEFT 0.21's BOFTConfig has no field beyond the ones below and PeftConfig's.
    peft_only_fields: ClassVar[dict[str, Any]] = {}

    peft_type: str = "BOFT"
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            check_str_list(self, name, allow_str=True)
        check_positive_int(self, "boft_block_size", allow_zero=True)
        check_positive_int(self, "boft_block_num", allow_zero=True)
        check_positive_int(self, "boft_n_butterfly_factor")
        check_probability(self, "boft_dropout")
        check_choice(self, "bias", ("none", "all", "boft_only"))
        for name in ("fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")
        check_layer_selection(self)
        self._check_block_sizing()
        self._check_butterfly()

    def _check_block_sizing(self) -> None:
        """PEFT's rule: boft_block_size x boft_block_num = in_features, so exactly one of them is non-zero."""
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise fail(
                self,
                "boft_block_size",
                self.boft_block_size,
                "non-zero when boft_block_num is 0 (give exactly one of boft_block_size, the size of a block, "
                "and boft_block_num, the number of blocks)",
            )
        if self.boft_block_size != 0 and self.boft_block_num != 0:
            raise fail(
                self,
                "boft_block_num",
                self.boft_block_num,
                f"0 when boft_block_size is non-zero ({self.boft_block_size}): give exactly one of them, as "
                "boft_block_size x boft_block_num = in_features "
                f"(e.g. boft_block_size=0, boft_block_num={self.boft_block_num})",
            )

    def _check_butterfly(self) -> None:
        """What PEFT checks of the butterfly factor without knowing the layer (the rest: see the layer)."""
        factor = self.boft_n_butterfly_factor
        if factor == 1:
            return
        if self.boft_block_num and self.boft_block_num % 2 ** (factor - 1):
            largest = largest_factor_for(self.boft_block_num)
            raise fail(
                self,
                "boft_n_butterfly_factor",
                factor,
                f"at most {largest} with boft_block_num={self.boft_block_num}: each factor after the first "
                "pairs up blocks, so 2**(boft_n_butterfly_factor - 1) must divide boft_block_num",
            )
        if self.boft_block_size % 2:
            raise fail(
                self,
                "boft_block_size",
                self.boft_block_size,
                f"an even number when boft_n_butterfly_factor > 1 ({factor}): the butterfly permutations "
                "move half blocks",
            )
