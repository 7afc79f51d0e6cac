"""LNTuningConfig: PEFT's LN tuning fields, names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit.config import PeftConfig, check_str_list


@dataclass
class LNTuningConfig(PeftConfig):
    """LN tuning: each targeted module (a LayerNorm or RMSNorm) is replaced in the forward pass by a
    trainable copy of itself, one per adapter; the original stays frozen.

    ``target_modules``: module names (or name suffixes), or a regex matched against the full path; None
    picks PEFT's default norms for the model's architecture. ``exclude_modules``: names or a regex to leave
    out. ``modules_to_save`` (from :class:`peftkit.PeftConfig`): modules trained in full and saved.
    """

    method: ClassVar[str] = "ln_tuning"
    # PEFT 0.21's LNTuningConfig has no field beyond the ones below and PeftConfig's.
    peft_only_fields: ClassVar[dict[str, Any]] = {}

    peft_type: str = "LN_TUNING"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_str_list(self, "target_modules", allow_str=True)
        check_str_list(self, "exclude_modules", allow_str=True)
