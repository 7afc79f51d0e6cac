"""What a plugin says about each method it provides, and the decorator that routes per-method hooks."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from peftkit.config import PeftConfig

hookimpl = pluggy.HookimplMarker("peftkit")

FAMILIES = ("weight-delta", "activation-scaling", "inserted-module", "bias-only", "prompt")


@dataclass(frozen=True)
class MethodSpec:
    """A method as its plugin registers it.

    ``name`` is the method's short name (``"lora"``), ``peft_type`` the value PEFT writes in
    ``adapter_config.json`` (``"LORA"``). ``key_root`` is the prefix PEFT puts before module paths in the
    saved tensors: ``"base_model.model."`` for methods that wrap layers, ``"base_model."`` for prompt
    methods. ``distribution`` and ``version`` are filled in by discovery from the installed package.
    ``exports`` names more objects that ``from peftkit import <name>`` finds, as ``"module:attribute"``
    strings imported on first use (LoRA's ``"peftkit_lora.eva_init:initialize_lora_eva_weights"``).
    """

    name: str
    config_class: type[PeftConfig]
    peft_type: str
    family: str
    mergeable: bool = True
    supports_multiple_active: bool = True
    needs_tokenizer: bool = False
    key_root: str = "base_model.model."
    distribution: str | None = None
    version: str | None = None
    exports: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"MethodSpec.family must be one of {FAMILIES}, got {self.family!r}")

    def capabilities(self) -> dict[str, bool]:
        return {
            "mergeable": self.mergeable,
            "supports_multiple_active": self.supports_multiple_active,
            "needs_tokenizer": self.needs_tokenizer,
        }


def method_of(config: Any) -> str | None:
    """The method name a config belongs to (its class attribute ``method``)."""
    return getattr(type(config), "method", None)


def method_impl(method: str, **hookimpl_options: Any) -> Callable[[Callable], Callable]:
    """Mark a hook implementation that answers only for configs of ``method``.

    Per-method hooks all take a ``config`` argument; for any other method's config the wrapped
    implementation returns None, which pluggy treats as "not mine". This is the one place dispatch
    is written, so plugins never repeat it::

        @method_impl("lora")
        def peftkit_inject_adapter(peft_model, config, adapter_name): ...
    """

    def decorate(func: Callable) -> Callable:
        params = list(inspect.signature(func).parameters)
        if "config" not in params:
            raise TypeError(f"{func.__qualname__} is a per-method hook and must take a 'config' argument")
        position = params.index("config")

        @functools.wraps(func)
        def answer_for_own_method(*args: Any) -> Any:
            if method_of(args[position]) != method:
                return None
            return func(*args)

        answer_for_own_method.peftkit_method = method  # what plugins.may_answer reads
        return hookimpl(**hookimpl_options)(answer_for_own_method)

    return decorate
