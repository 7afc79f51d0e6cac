"""BottleneckConfig: AdapterHub's bottleneck-adapter fields, with the three classic styles as presets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit.config import PeftConfig, check_choice, check_probability, check_str_list, fail

STYLES = ("houlsby", "pfeiffer", "parallel")
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "swish", "silu", "tanh", "sigmoid", "leakyrelu", "linear")
INIT_WEIGHTS = ("mam_adapter", "bert", "houlsby")
# what a parallel adapter beside the feed-forward block reads: the residual stream before the block's layer
# norm (AdapterHub's ParBnConfig), or the block's own input (after that norm on pre-norm models)
PARALLEL_INPUTS = ("residual", "block_input")

# AdapterHub's presets: DoubleSeqBnConfig (Houlsby et al. 2019), SeqBnConfig (Pfeiffer et al. 2020) and
# ParBnConfig (He et al. 2022). init_weights is the exception: every style starts at the zero-up init.
STYLE_DEFAULTS: dict[str, dict[str, object]] = {
    "houlsby": {
        "reduction_factor": 16,
        "non_linearity": "swish",
        "scaling": 1.0,
        "original_ln_before": False,
    },
    "pfeiffer": {"reduction_factor": 16, "non_linearity": "relu", "scaling": 1.0, "original_ln_before": True},
    "parallel": {"reduction_factor": 2, "non_linearity": "relu", "scaling": 4.0, "original_ln_before": False},
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters: ``h ↦ h + scaling · up(act(down(h)))`` after a block, or beside it (parallel).

    ``style`` picks where adapters go: ``"houlsby"`` after the attention and the feed-forward block,
    ``"pfeiffer"`` after the feed-forward block, ``"parallel"`` beside the feed-forward block (fed its
    input). ``reduction_factor``, ``non_linearity`` and ``scaling`` left at None take the style's
    AdapterHub default. ``original_ln_before`` (AdapterHub's name; True for ``"pfeiffer"``, False
    otherwise): whether a sequential adapter reads the block's output after the residual connection
    and the layer norm that follows it (as AdapterHub's ``SeqBnConfig``) rather than the block's output
    itself (``DoubleSeqBnConfig``). ``parallel_input`` (``style="parallel"`` only): what the adapter beside
    the feed-forward block reads, ``"residual"`` (the default, AdapterHub's ``ParBnConfig``: the residual
    stream r, before the layer norm that pre-norm models such as Llama and GPT-2 apply to the block's input)
    or ``"block_input"`` (the block's own input, LN(r) on those models). On post-norm models such as BERT
    the two are the same. ``attention_modules`` and ``feedforward_modules`` name the blocks for
    models whose layout peftkit-bottleneck does not know (names or name suffixes, or a regex on the full
    path).
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
    original_ln_before: bool | None = None
    parallel_input: str | None = None
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
        if not isinstance(self.original_ln_before, bool):
            raise fail(self, "original_ln_before", self.original_ln_before, "True, False or None")
        if self.original_ln_before and self.is_parallel:
            raise fail(
                self,
                "original_ln_before",
                True,
                "False or None with style='parallel' (a parallel adapter reads what enters the block, see parallel_input)",
            )
        if self.is_parallel:
            if self.parallel_input is None:
                self.parallel_input = "residual"
            check_choice(self, "parallel_input", PARALLEL_INPUTS)
        elif self.parallel_input is not None:
            raise fail(
                self,
                "parallel_input",
                self.parallel_input,
                f"None with style={self.style!r} (it says what a parallel adapter reads)",
            )
        check_str_list(self, "attention_modules", allow_str=True)
        check_str_list(self, "feedforward_modules", allow_str=True)
        if self.attention_modules is not None and self.style != "houlsby":
            raise fail(
                self,
                "attention_modules",
                self.attention_modules,
                f"None with style={self.style!r} (only 'houlsby' puts adapters after the attention block)",
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BottleneckConfig:
        # saved by peftkit-bottleneck 0.1, before original_ln_before existed: its sequential adapters all
        # read the block's output, which original_ln_before=False keeps
        if data.get("peft_type") == "BOTTLENECK" and "original_ln_before" not in data:
            data = {**data, "original_ln_before": False}
        # saved before parallel_input existed (peftkit-bottleneck 0.3 and older): parallel adapters read the
        # feed-forward block's input
        if (
            data.get("peft_type") == "BOTTLENECK"
            and data.get("style") == "parallel"
            and "parallel_input" not in data
        ):
            data = {**data, "parallel_input": "block_input"}
        return super().from_dict(data)

    @property
    def is_parallel(self) -> bool:
        return self.style == "parallel"

    @property
    def reads_residual_stream(self) -> bool:
        """Whether a parallel adapter reads the residual stream before the feed-forward block's norm."""
        return self.is_parallel and self.parallel_input == "residual"

    @property
    def adapts_attention(self) -> bool:
        return self.style == "houlsby"

    @property
    def reads_normalized_sum(self) -> bool:
        """Whether a sequential adapter reads the block's output after the residual add (and its norm)."""
        return bool(self.original_ln_before) and not self.is_parallel
