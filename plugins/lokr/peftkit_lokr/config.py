"""LoKrConfig: PEFT's LoKr fields, names, defaults and meaning."""

from __future__ import annotations

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

INIT_CHOICES = (True, False, "lycoris")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclass
class LoKrConfig(PeftConfig):
    """LoKr: adds ``(alpha / r) · kron(W1, W2)``, reshaped to the weight's shape, to each targeted layer.

    ``W1`` and ``W2`` split the weight's output and input sizes by :func:`peftkit_lokr.factorization`;
    each is a full matrix, or a rank-``r`` product when ``r`` is small against its size (``W1`` only
    with ``decompose_both``). ``rank_pattern`` and ``alpha_pattern`` map regexes (matched on the end of
    the module path) to per-module values.
    """

    method: ClassVar[str] = "lokr"
    # PEFT's LoKrConfig has no field this plugin leaves out.
    peft_only_fields: ClassVar[dict[str, Any]] = {}

    peft_type: str = "LOKR"
    r: int = 8
    alpha: int | float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise fail(self, "alpha", self.alpha, "a positive number")
        check_probability(self, "rank_dropout")
        check_probability(self, "module_dropout")
        for name in ("use_effective_conv2d", "decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor >= 1):
            raise fail(
                self,
                "decompose_factor",
                factor,
                "-1 (split each size near its square root) or an integer >= 1",
            )
        if self.init_weights not in INIT_CHOICES or (
            isinstance(self.init_weights, int) and not isinstance(self.init_weights, bool)
        ):
            raise fail(self, "init_weights", self.init_weights, "True, False or 'lycoris'")
        check_str_list(self, "target_modules", allow_str=True)
        check_str_list(self, "exclude_modules", allow_str=True)
        check_layer_selection(self)
        self._check_patterns()

    def _check_patterns(self) -> None:
        # PEFT types both as Optional: a saved None means "no per-module values"
        self.rank_pattern = {} if self.rank_pattern is None else self.rank_pattern
        self.alpha_pattern = {} if self.alpha_pattern is None else self.alpha_pattern
        if not isinstance(self.rank_pattern, dict):
            raise fail(
                self, "rank_pattern", self.rank_pattern, "a dict of module regex to positive integer rank"
            )
        if not isinstance(self.alpha_pattern, dict):
            raise fail(self, "alpha_pattern", self.alpha_pattern, "a dict of module regex to positive alpha")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(
                    self, "rank_pattern", {key: value}, "a dict of module regex to positive integer rank"
                )
        for key, value in self.alpha_pattern.items():
            if not _is_number(value) or value <= 0:
                raise fail(self, "alpha_pattern", {key: value}, "a dict of module regex to positive alpha")
