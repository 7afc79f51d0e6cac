"""AdaLoraConfig: PEFT's AdaLoRA fields, names, defaults and meaning (LoRA's fields plus a rank budget)."""

from __future__ import annotations

import warnings
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

BIAS_CHOICES = ("none", "all", "lora_only")
UNUSED_R = 8  # PEFT's LoraConfig default for ``r``, which AdaLoRA ignores


@dataclass
class AdaLoraConfig(PeftConfig):
    """AdaLoRA: each targeted layer adds ``lora_alpha / init_r · P Λ Q`` and the ranks shrink while training.

    Training has three phases over ``total_step`` optimizer steps: ``tinit`` warm-up steps at ``init_r``,
    a budget that falls as a cubic from ``init_r`` to ``target_r`` per module until ``total_step - tfinal``
    (pruning every ``deltaT`` steps), then ``tfinal`` steps at the final ranks. ``rank_pattern`` is filled
    by training (``"<module path>.lora_E"`` → which of the ``init_r`` triplets are kept), and a saved
    adapter with a ``rank_pattern`` loads at those ranks.
    """

    method: ClassVar[str] = "adalora"
    peft_only_fields: ClassVar[dict[str, Any]] = {
        "use_rslora": False,
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
        "use_qalora": False,
        "trainable_token_indices": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "monteclora_config": None,
        "megatron_config": None,
        "layer_replication": None,
        "target_parameters": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        # PEFT fields that change nothing unless one of the above is set
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
        "ensure_weight_tying": False,
        "runtime_config": None,
    }

    peft_type: str = "ADALORA"
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    r: int = UNUSED_R
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_lora_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "init_r")
        check_positive_int(self, "target_r")
        if self.target_r > self.init_r:
            raise fail(self, "target_r", self.target_r, f"at most init_r={self.init_r} (ranks only shrink)")
        self._check_schedule()
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            # PEFT's RankAllocator asserts 0 < beta < 1: at 0 the uncertainty is always 0, so every score is
            # 0 and every triplet ties with the threshold and is pruned
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise fail(self, name, value, "a number in (0, 1)")
        if (
            isinstance(self.orth_reg_weight, bool)
            or not isinstance(self.orth_reg_weight, (int, float))
            or self.orth_reg_weight < 0
        ):
            raise fail(self, "orth_reg_weight", self.orth_reg_weight, "a number >= 0")
        self._check_lora_fields()
        self._check_rank_pattern()

    def _check_schedule(self) -> None:
        if self.total_step is None:
            raise fail(
                self, "total_step", None, "the number of training steps, an integer >= 1 (AdaLoRA needs it)"
            )
        check_positive_int(self, "total_step")
        check_positive_int(self, "tinit", allow_zero=True)
        check_positive_int(self, "tfinal", allow_zero=True)
        check_positive_int(self, "deltaT")
        if self.tinit + self.tfinal >= self.total_step:
            raise fail(
                self,
                "tinit",
                self.tinit,
                f"less than total_step - tfinal = {self.total_step} - {self.tfinal}, so that the ranks have "
                "steps to shrink in (decrease tinit or tfinal, or increase total_step)",
            )

    def _check_lora_fields(self) -> None:
        check_positive_int(self, "r")
        if self.r != UNUSED_R:
            warnings.warn(
                f"AdaLoraConfig.r={self.r} is ignored, as in PEFT: AdaLoRA starts every layer at init_r "
                f"({self.init_r}); set init_r for the initial rank",
                UserWarning,
                stacklevel=3,
            )
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or self.lora_alpha <= 0
        ):
            raise fail(self, "lora_alpha", self.lora_alpha, "a positive number")
        check_probability(self, "lora_dropout")
        check_choice(self, "bias", BIAS_CHOICES)
        for name in ("init_lora_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")
        check_str_list(self, "target_modules", allow_str=True)
        check_str_list(self, "exclude_modules", allow_str=True)
        check_layer_selection(self)

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        allowed = (
            f"None or a dict of '<module path>.lora_E' to a list of init_r={self.init_r} booleans "
            "(kept triplets)"
        )
        if not isinstance(self.rank_pattern, dict):
            raise fail(self, "rank_pattern", self.rank_pattern, allowed)
        for key, kept in self.rank_pattern.items():
            if (
                not isinstance(key, str)
                or not isinstance(kept, list)
                or len(kept) != self.init_r
                or not all(isinstance(v, bool) for v in kept)
            ):
                raise fail(self, "rank_pattern", {key: kept}, allowed)
