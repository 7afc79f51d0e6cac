"""VeRA's config: PEFT's ``VeraConfig`` fields, names and defaults (peft 0.21)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit.config import (
    PeftConfig,
    check_layer_selection,
    check_positive_int,
    check_probability,
    check_str_list,
    fail,
)


@dataclass
class VeraConfig(PeftConfig):
    """VeRA (Kopiczko et al. 2024): per layer ``ΔW = Λ_b B Λ_d A``.

    ``A`` (r × in) and ``B`` (out × r) are random, frozen and shared by every adapted layer, drawn
    from ``projection_prng_key``; each layer trains only the vectors ``d`` (r, starts at ``d_initial``)
    and ``b`` (out, starts at zero, so a new adapter changes nothing). ``save_projection`` writes A and
    B into the adapter file; without it they are drawn again from the key when the adapter loads.
    ``fan_in_fan_out`` is kept for PEFT's files only: peftkit's layer hooks read GPT-2's transposed
    ``Conv1D`` weights on their own.
    """

    method: ClassVar[str] = "vera"
    peft_only_fields: ClassVar[dict[str, Any]] = {"bias": "none"}

    peft_type: str = "VERA"
    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_str_list(self, "target_modules", allow_str=True, allow_none=False)
        check_positive_int(self, "projection_prng_key", allow_zero=True)
        check_probability(self, "vera_dropout")
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise fail(self, "d_initial", self.d_initial, "a number")
        check_layer_selection(self)
