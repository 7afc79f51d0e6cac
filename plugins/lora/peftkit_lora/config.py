"""LoraConfig: PEFT's LoRA fields, names, defaults and meaning."""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
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

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora", "loftq")  # and "pissa_niter_<N>"
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # PiSSA by a fast SVD of N subspace iterations
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoftQConfig:
    """LoftQ's settings (``init_lora_weights="loftq"``): quantize to ``loftq_bits`` (4: NF4, 8: int8) and
    alternate quantizing and fitting the rank-r adapter to the residual ``loftq_iter`` times."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        check_choice(self, "loftq_bits", (4, 8))
        check_positive_int(self, "loftq_iter")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA: adds ``scaling · B A`` to each targeted layer, ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

    ``target_modules``: names or name suffixes, a regex matched against the full module path, or
    ``"all-linear"``; None picks PEFT's default for known architectures. ``rank_pattern`` and
    ``alpha_pattern`` map regexes (matched on the end of the module path) to per-module values.
    """

    method: ClassVar[str] = "lora"
    peft_only_fields: ClassVar[dict[str, Any]] = {
        "use_qalora": False,
        "trainable_token_indices": None,
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "monteclora_config": None,
        "megatron_config": None,
        "layer_replication": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        # PEFT fields that change nothing unless one of the above is set
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
        "ensure_weight_tying": False,
        "runtime_config": None,
    }

    peft_type: str = "LORA"
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # parameters (not modules) to adapt, by full name or name suffix: the fused 3-D expert tensors of
    # mixture-of-experts models (peftkit_lora.parameter)
    target_parameters: list[str] | None = None
    # LoftQ's settings as a dict, as PEFT stores them ({} unless init_lora_weights="loftq")
    loftq_config: LoftQConfig | dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or self.lora_alpha <= 0
        ):
            raise fail(self, "lora_alpha", self.lora_alpha, "a positive number")
        check_probability(self, "lora_dropout")
        check_choice(self, "bias", BIAS_CHOICES)
        self._check_init()
        if self.lora_bias is not False:
            raise fail(self, "lora_bias", self.lora_bias, "False: peftkit-lora does not implement lora_bias")
        for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")
        check_str_list(self, "target_modules", allow_str=True)
        check_str_list(self, "exclude_modules", allow_str=True)
        check_layer_selection(self)
        self._check_patterns()
        self._check_target_parameters()
        self._check_loftq()

    def _check_init(self) -> None:
        init = self.init_lora_weights
        valid = (isinstance(init, bool) or isinstance(init, str)) and (
            init in INIT_CHOICES or isinstance(init, str) and PISSA_NITER.fullmatch(init) is not None
        )
        if not valid or init == "pissa_niter_0":
            raise fail(
                self,
                "init_lora_weights",
                init,
                "True, False, 'gaussian', 'pissa', 'pissa_niter_<N>' (N >= 1 iterations), 'olora' or 'loftq'",
            )

    def _check_patterns(self) -> None:
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(
                    self, "rank_pattern", {key: value}, "a dict of module regex to positive integer rank"
                )
        for key, value in self.alpha_pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise fail(self, "alpha_pattern", {key: value}, "a dict of module regex to positive alpha")

    def _check_target_parameters(self) -> None:
        """A list of parameter names; LoRA on a parameter never sees the layer's input, so what acts on the
        input (dropout, DoRA's norm of the weight, fan_in_fan_out, lora_bias) is refused, as PEFT refuses it."""
        value = self.target_parameters
        if value is None:
            return
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
            raise fail(
                self, "target_parameters", value, "a list of parameter names or None (no regex string)"
            )
        if not all(isinstance(name, str) and name for name in value):
            raise fail(self, "target_parameters", value, "a list of parameter names (non-empty strings)")
        self.target_parameters = sorted(value)  # as PEFT writes it
        if not self.target_parameters:
            return  # PEFT's "no parameters": nothing to refuse
        refused = {"lora_dropout": 0.0, "use_dora": False, "fan_in_fan_out": False}
        for name, allowed in refused.items():
            if getattr(self, name) != allowed:
                raise fail(
                    self,
                    name,
                    getattr(self, name),
                    f"{allowed} when target_parameters is set (LoRA on a parameter cannot apply it)",
                )

    def save_pretrained(self, directory) -> None:
        """A LoftQ adapter is saved as PEFT's LoftQ recipe saves it, with ``init_lora_weights=True``: its A
        and B are fitted to the Q that the saved base holds, and loading them onto that base (quantized,
        as it is meant to be) must not fit them again."""
        if self.init_lora_weights == "loftq":
            self.replace(init_lora_weights=True, loftq_config={}).save_pretrained(directory)
        else:
            super().save_pretrained(directory)

    def _check_loftq(self) -> None:
        """PEFT's rule: "loftq" needs a loftq_config, kept as a plain dict; a loftq_config without it is ignored."""
        value = self.loftq_config
        if isinstance(value, LoftQConfig):
            value = dataclasses.asdict(value)
        elif isinstance(value, dict) and value:
            unknown = sorted(set(value) - {"loftq_bits", "loftq_iter"})
            if unknown:
                raise fail(
                    self, "loftq_config", value, "a LoftQConfig or a dict of loftq_bits and loftq_iter"
                )
            value = dataclasses.asdict(LoftQConfig(**value))
        elif not isinstance(value, dict):
            raise fail(self, "loftq_config", value, "a LoftQConfig, a dict of its fields, or {}")
        self.loftq_config = value
        if self.init_lora_weights == "loftq" and not value:
            raise fail(
                self,
                "loftq_config",
                value,
                "a LoftQConfig (e.g. LoftQConfig(loftq_bits=4)) with init_lora_weights='loftq'",
            )
        if value and self.init_lora_weights != "loftq":
            warnings.warn(
                "LoraConfig.loftq_config is ignored unless init_lora_weights='loftq'",
                UserWarning,
                stacklevel=3,
            )
