"""AdapterFusionConfig: AdapterHub's AdapterFusion options, with its two presets (no torch: the plugin's
registration imports it)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from peftkit.config import PeftConfig, check_choice, check_probability, fail

# AdapterHub's DynamicAdapterFusionConfig and StaticAdapterFusionConfig
PRESETS: dict[str, dict[str, Any]] = {
    "dynamic": {
        "key": True,
        "query": True,
        "value": True,
        "query_before_ln": False,
        "regularization": True,
        "residual_before": False,
        "temperature": False,
        "value_before_softmax": True,
        "value_initialized": True,
        "dropout_prob": None,
    },
    "static": {
        "key": True,
        "query": True,
        "value": False,
        "query_before_ln": False,
        "regularization": False,
        "residual_before": False,
        "temperature": False,
        "value_before_softmax": True,
        "value_initialized": False,
        "dropout_prob": None,
    },
}
OPTIONS = tuple(PRESETS["dynamic"])
REGULARIZATION_WEIGHT = 0.01  # AdapterHub's: 0.01 · ‖I − V‖² summed over the fusion layers


@dataclass
class AdapterFusionConfig(PeftConfig):
    """An AdapterFusion layer over the bottleneck adapters ``adapter_names``.

    ``preset`` (``"dynamic"`` or ``"static"``) fills every option left at None: ``key``, ``query``, ``value``
    (which of the three projections exist), ``query_before_ln`` (the query reads the block's output before
    the layer norm), ``regularization`` (add ``0.01 · ‖I − V‖²`` to the loss while training),
    ``residual_before`` (add the residual to the values instead of the result), ``temperature`` (start the
    softmax at T = 50 and lower it by T/1000 each forward to 1), ``value_before_softmax``,
    ``value_initialized`` (V starts at the identity) and ``dropout_prob`` (on the attention scores; None
    takes the model's ``attention_probs_dropout_prob``, else 0).
    """

    method: ClassVar[str] = "adapter_fusion"

    peft_type: str = "ADAPTER_FUSION"
    adapter_names: list[str] | None = None
    preset: str = "dynamic"
    key: bool | None = None
    query: bool | None = None
    value: bool | None = None
    query_before_ln: bool | None = None
    regularization: bool | None = None
    residual_before: bool | None = None
    temperature: bool | None = None
    value_before_softmax: bool | None = None
    value_initialized: bool | None = None
    dropout_prob: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "preset", PRESETS)
        names = self.adapter_names
        if (
            not isinstance(names, (list, tuple))
            or not names
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise fail(
                self, "adapter_names", names, "a non-empty list of the bottleneck adapters to fuse, by name"
            )
        self.adapter_names = list(names)
        for option in OPTIONS:
            if option == "dropout_prob":
                continue
            if getattr(self, option) is None:
                setattr(self, option, PRESETS[self.preset][option])
            elif not isinstance(getattr(self, option), bool):
                raise fail(self, option, getattr(self, option), "True or False (None takes the preset's)")
        if self.dropout_prob is not None:
            check_probability(self, "dropout_prob")

    def required_adapters(self) -> list[str]:
        return list(self.adapter_names)

    def options(self) -> dict[str, Any]:
        """AdapterHub's ``AdapterFusionConfig`` fields and values."""
        return {option: getattr(self, option) for option in OPTIONS}

    @classmethod
    def from_options(
        cls, adapter_names: list[str], options: dict[str, Any], **fields_: Any
    ) -> AdapterFusionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"AdapterFusion options {unknown} are not AdapterHub's ({', '.join(OPTIONS)})")
        values = {k: v for k, v in options.items() if k in known}
        if isinstance(values.get("value_initialized"), str):  # AdapterHub types it as str and stores bools
            values["value_initialized"] = values["value_initialized"].lower() == "true"
        return cls(adapter_names=list(adapter_names), **values, **fields_)
