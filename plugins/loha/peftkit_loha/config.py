"""LoHaConfig: PEFT's LoHa fields, names, defaults and meaning."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkit.config import (
    PeftConfig,
    check_layer_selection,
    check_positive_int,
    check_probability,
    check_str_list,
    fail,
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class LoHaConfig(PeftConfig):
    """LoHa: adds ``(alpha / r) · (W1a W1b) ⊙ (W2a W2b)`` to each targeted Linear, Conv1d or Conv2d layer.

    ``target_modules``: names or name suffixes, a regex matched against the full module path, or
    ``"all-linear"``; None picks PEFT's default for known architectures. ``rank_pattern`` and
    ``alpha_pattern`` map regexes (matched on the end of the module path) to per-module values.
    ``use_effective_conv2d`` factors each Hadamard operand of a convolution with a kernel larger than 1
    through a small ``r × r × kernel`` core (FedPara's "Proposition 3") instead of flattening the kernel.
    """

    method: ClassVar[str] = "loha"
    # PEFT 0.21's LoHaConfig has no field beyond those below and PeftConfig's.
    peft_only_fields: ClassVar[dict[str, Any]] = {}

    peft_type: str = "LOHA"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    r: int = 8
    alpha: int | float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise fail(self, "alpha", self.alpha, "a positive number")
        check_probability(self, "rank_dropout")
        check_probability(self, "module_dropout")
        for name in ("use_effective_conv2d", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")
        check_str_list(self, "target_modules", allow_str=True)
        check_str_list(self, "exclude_modules", allow_str=True)
        check_layer_selection(self)
        self._check_pattern("rank_pattern", "a positive integer rank", _is_positive_int)
        self._check_pattern("alpha_pattern", "a positive alpha", lambda v: _is_number(v) and v > 0)

    def _check_pattern(self, name: str, value_kind: str, valid: Any) -> None:
        patterns = getattr(self, name)
        allowed = f"a dict of module regex to {value_kind}"
        if not isinstance(patterns, dict):
            raise fail(self, name, patterns, allowed)
        for key, value in patterns.items():
            if not isinstance(key, str) or not valid(value):
                raise fail(self, name, {key: value}, allowed)
            try:
                re.compile(key)
            except re.error as exc:
                raise fail(self, name, {key: value}, f"{allowed} (the key is not a regex: {exc})") from None


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
