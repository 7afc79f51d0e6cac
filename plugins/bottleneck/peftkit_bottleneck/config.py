"""BottleneckConfig: AdapterHub's bottleneck-adapter fields, with the three classic styles as presets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from peftkit.config import PeftConfig, check_choice, check_probability, check_str_list, fail

STYLES = ("houlsby", "pfeiffer", "parallel")
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "swish", "silu", "tanh", "sigmoid", "leakyrelu", "linear")
INIT_WEIGHTS = ("mam_adapter", "bert", "houlsby")

# AdapterHub's presets: DoubleSeqBnConfig (Houlsby et al. 2019), SeqBnConfig (Pfeiffer et al. 2020) and
# ParBnConfig (He et al. 2022). init_weights is the exception: every style starts at the zero-up init.
STYLE_DEFAULTS: dict[str, dict[str, object]] = {
    "houlsby": {"reduction_factor": 16, "non_linearity": "swish", "scaling": 1.0},
    "pfeiffer": {"reduction_factor": 16, "non_linearity": "relu", "scaling": 1.0},
    "parallel": {"reduction_factor": 2, "non_linearity": "relu", "scaling": 4.0},
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters: ``h ↦ h + scaling · up(act(down(h)))`` after a block, or beside it (parallel).

    ``style`` picks where adapters go: ``"houlsby"`` after the attention and the feed-forward block,
    ``"pfeiffer"`` after the feed-forward block, ``"parallel"`` beside the feed-forward block (fed its
    input). ``reduction_factor``, ``non_linearity`` and ``scaling`` left at None take the style's
    AdapterHub default. ``attention_modules`` and ``feedforward_modules`` name the blocks for models
    whose layout peftkit-bottleneck does not know (names or name suffixes, or a regex on the full path).
    """

    method: ClassVar[str] = "bottleneck"

    peft_type: str = "BOTTLENECK"
    style: str = "pfeiffer"
    reduction_factor: int | float | None = None
    non_linearity: str | None = None
    scaling: float | None = None
    init_weights: str = "mam_adapter"
    dropout: float = 0.0
    cross_adapter: bool = False
    attention_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "style", STYLES)
        for name, default in STYLE_DEFAULTS[self.style].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if not _is_number(self.reduction_factor) or self.reduction_factor < 1:
            raise fail(
                self,
                "reduction_factor",
                self.reduction_factor,
                "a number >= 1 (the bottleneck has hidden_size // reduction_factor features)",
            )
        if isinstance(self.non_linearity, str):
            self.non_linearity = self.non_linearity.lower()  # AdapterHub reads it case-insensitively
        check_choice(self, "non_linearity", NON_LINEARITIES)
        if not _is_number(self.scaling):
            raise fail(self, "scaling", self.scaling, "a finite number")
        self.scaling = float(self.scaling)
        check_choice(self, "init_weights", INIT_WEIGHTS)
        check_probability(self, "dropout")
        if not isinstance(self.cross_adapter, bool):
            raise fail(self, "cross_adapter", self.cross_adapter, "True or False")
        check_str_list(self, "attention_modules", allow_str=True)
        check_str_list(self, "feedforward_modules", allow_str=True)
        if self.attention_modules is not None and self.style != "houlsby":
            raise fail(
                self,
                "attention_modules",
                self.attention_modules,
                f"None with style={self.style!r} (only 'houlsby' puts adapters after the attention block)",
            )

    @property
    def is_parallel(self) -> bool:
        return self.style == "parallel"

    @property
    def adapts_attention(self) -> bool:
        return self.style == "houlsby"
