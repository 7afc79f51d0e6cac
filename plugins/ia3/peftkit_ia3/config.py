"""IA3Config: PEFT's (IA)³ fields, names, defaults and meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit.config import PeftConfig, check_str_list, fail


@dataclass
class IA3Config(PeftConfig):
    """(IA)³: a learned vector ``l`` per targeted layer that scales the layer's input or output.

    ``target_modules``: names or name suffixes, a regex matched against the full module path, or
    ``"all-linear"``; None picks PEFT's default for known architectures. ``feedforward_modules``: the
    targets whose *input* is scaled, ``y = W (x ⊙ l) + b`` (the others scale the output,
    ``y = (W x + b) ⊙ l``); a list of names (a module is one when its path ends with a name) or a regex
    matched against the full path; None picks PEFT's default for the architecture. As a list it must
    be a subset of a list of ``target_modules``.
    """

    method: ClassVar[str] = "ia3"
    # PEFT 0.21's IA3Config has no field beyond the ones below and PeftConfig's.
    peft_only_fields: ClassVar[dict[str, Any]] = {}

    peft_type: str = "IA3"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            check_str_list(self, name, allow_str=True)
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, name), bool):
                raise fail(self, name, getattr(self, name), "True or False")
        self._check_feedforward_among_targets()

    def _check_feedforward_among_targets(self) -> None:
        """PEFT's rule, checked only when both are lists: a regex on either side is not compared."""
        if not isinstance(self.feedforward_modules, list) or not isinstance(self.target_modules, list):
            return
        strays = [name for name in self.feedforward_modules if name not in self.target_modules]
        if strays:
            raise fail(
                self,
                "feedforward_modules",
                self.feedforward_modules,
                f"a subset of target_modules {self.target_modules!r} (not targets: {strays!r})",
            )
