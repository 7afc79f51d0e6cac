"""The one owner of the plugin manager, and the typed calls the rest of the core makes through it.

Nothing loads at import: the first call that needs plugins discovers them. Tests register plugin
objects directly with :func:`register` (or :func:`registered` as a context manager).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pluggy

from peftkit import hookspecs
from peftkit.discovery import COMMANDS_ENTRY_POINT_GROUP, PluginOrigin, load_entry_points
from peftkit.errors import PluginConflictError, UnknownMethodError
from peftkit.method import MethodSpec, method_of

if TYPE_CHECKING:
    from pathlib import Path

    import click
    import torch
    from torch import nn

    from peftkit.adapter_layer import AdapterLayer
    from peftkit.config import PeftConfig
    from peftkit.foreign_format import ForeignAdapter
    from peftkit.layer_access import LayerFeatures
    from peftkit.model import PeftModel

# the registered names of the plugins that ship inside the core
BUILTIN_PREFIX = "peftkit.builtin."

# PEFT's peft_type values and the peftkit package that provides each, for "install X" advice.
PACKAGE_FOR_PEFT_TYPE = {
    "LORA": "peftkit-lora",
    "PROMPT_TUNING": "peftkit-prompt-tuning",
    "PREFIX_TUNING": "peftkit-prefix-tuning",
    "P_TUNING": "peftkit-p-tuning",
    "IA3": "peftkit-ia3",
    "LOHA": "peftkit-loha",
    "LOKR": "peftkit-lokr",
    "ADALORA": "peftkit-adalora",
    "BOTTLENECK": "peftkit-bottleneck",
    "BITFIT": "peftkit-bitfit",
}


# the facade calls of the hooks that rewrite a call's inputs or outputs (PeftModel asks only the adapters
# whose method may answer them; see may_answer)
REWRITING_HOOKS = ("transform_inputs", "transform_outputs", "prepare_generation", "prepare_generation_step")

# bumped whenever the plugins registered change (register, unregister, reset): what was derived from the
# hook implementations registered then (PeftModel's answering adapters) is to be derived again
_generation = 0


def _bump_generation() -> None:
    global _generation
    _generation += 1


def generation() -> int:
    return _generation


class PluginHost:
    """The plugin manager with what discovery found, and the method registry built from it."""

    def __init__(self, discover: bool = True) -> None:
        self.pm = pluggy.PluginManager("peftkit")
        self.pm.add_hookspecs(hookspecs)
        self.origins: dict[str, PluginOrigin] = {}
        self.broken: list[PluginOrigin] = []
        self._methods: dict[str, MethodSpec] | None = None
        self._model_methods: dict[str, Any] | None = None
        self._owners: dict[str, str] = {}
        # imported here, not at the top, so that importing this module (as the CLI does) stays torch-free
        from peftkit.builtin import torch_layers

        self.pm.register(torch_layers, name=BUILTIN_PREFIX + "torch_layers")
        if discover:
            loaded, self.broken = load_entry_points()
            for plugin, origin in loaded:
                self.pm.register(plugin, name=origin.name)
                self.origins[origin.name] = origin

    def register(self, plugin: object, name: str | None = None, origin: PluginOrigin | None = None) -> str:
        registered = self.pm.register(plugin, name=name)
        if origin is not None:
            self.origins[registered] = origin
        self._methods = self._model_methods = None
        _bump_generation()
        return registered

    def unregister(self, plugin: object) -> None:
        name = self.pm.get_name(plugin)
        self.pm.unregister(plugin)
        self.origins.pop(name, None)
        self._methods = self._model_methods = None
        _bump_generation()

    @property
    def methods(self) -> dict[str, MethodSpec]:
        if self._methods is None:
            self._methods = self._collect_methods()
        return self._methods

    def _collect_methods(self) -> dict[str, MethodSpec]:
        methods: dict[str, MethodSpec] = {}
        owner: dict[str, str] = {}
        plugin_names: dict[str, str] = {}
        # Ask each implementation on its own, so every method is tied to the plugin that registered it.
        for impl in self.pm.hook.peftkit_register_methods.get_hookimpls():
            origin = self.origins.get(impl.plugin_name)
            label = origin.distribution if origin and origin.distribution else impl.plugin_name
            for spec in impl.function() or []:
                for key, what in ((spec.name, "method name"), (spec.peft_type, "peft_type")):
                    if key in owner:
                        raise PluginConflictError(
                            f"plugins {owner[key]!r} and {label!r} both provide the {what} {key!r}; "
                            "uninstall one, or block one with PEFTKIT_BLOCK_PLUGINS"
                        )
                if origin is not None:
                    spec = dataclasses.replace(
                        spec,
                        distribution=spec.distribution or origin.distribution,
                        version=spec.version or origin.version,
                    )
                owner[spec.name] = owner[spec.peft_type] = label
                methods[spec.name] = spec
                plugin_names[spec.name] = impl.plugin_name
        self._owners = plugin_names
        return methods

    @property
    def model_methods(self) -> dict[str, Any]:
        """The methods plugins add to PeftModel (``peftkit_model_methods``), collected once per registration."""
        if self._model_methods is None:
            self._model_methods = self._collect_model_methods()
        return self._model_methods

    def _collect_model_methods(self) -> dict[str, Any]:
        found: dict[str, tuple[str, Any]] = {}
        for impl in self.pm.hook.peftkit_model_methods.get_hookimpls():
            for method_name, function in (impl.function() or {}).items():
                if method_name in found:
                    raise PluginConflictError(
                        f"plugins {found[method_name][0]!r} and {impl.plugin_name!r} both add the PeftModel "
                        f"method {method_name!r}; uninstall one, or block one with PEFTKIT_BLOCK_PLUGINS"
                    )
                found[method_name] = (impl.plugin_name, function)
        return {method_name: function for method_name, (_, function) in found.items()}

    def plugin_of(self, method_name: str) -> str:
        """The registered name of the plugin providing a method: a key of ``origins``, a name for ``hooks_of``."""
        if method_name not in self.methods:
            raise UnknownMethodError(f"no installed plugin provides the method {method_name!r}")
        return self._owners[method_name]

    def hooks_of(self, plugin_name: str) -> list[str]:
        plugin = self.pm.get_plugin(plugin_name)
        return sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])


_host: PluginHost | None = None


def host() -> PluginHost:
    """The process's plugin host, created (and plugins discovered) on first use."""
    global _host
    if _host is None:
        _host = PluginHost()
    return _host


def reset(discover: bool = True) -> PluginHost:
    """Start over with a fresh host: for tests, and after installing a plugin in a running process."""
    global _host
    _host = PluginHost(discover=discover)
    _bump_generation()
    return _host


def register(plugin: object, name: str | None = None) -> str:
    return host().register(plugin, name=name)


def unregister(plugin: object) -> None:
    host().unregister(plugin)


@contextlib.contextmanager
def registered(plugin: object, name: str | None = None) -> Iterator[object]:
    """Register a plugin object for the duration of a ``with`` block."""
    register(plugin, name=name)
    try:
        yield plugin
    finally:
        unregister(plugin)


# --- the method registry ---------------------------------------------------------------------------
def methods() -> dict[str, MethodSpec]:
    return host().methods


def package_for_peft_type(peft_type: str) -> str:
    """The distribution to install for a peft_type (by peftkit's naming rule when not a known one)."""
    return PACKAGE_FOR_PEFT_TYPE.get(peft_type, "peftkit-" + peft_type.lower().replace("_", "-"))


def _install_hint(peft_type: str) -> str:
    return f"install {package_for_peft_type(peft_type)!r} to use it"


def _installed() -> str:
    names = sorted(f"{spec.name} ({spec.peft_type})" for spec in methods().values())
    return ", ".join(names) if names else "none"


def method_named(name: str) -> MethodSpec:
    spec = methods().get(name)
    if spec is None:
        raise UnknownMethodError(
            f"no installed plugin provides the method {name!r}; installed methods: {_installed()}"
        )
    return spec


def method_for_peft_type(peft_type: str) -> MethodSpec:
    for spec in methods().values():
        if spec.peft_type == peft_type:
            return spec
    raise UnknownMethodError(
        f"no installed plugin provides peft_type {peft_type!r} ({_install_hint(peft_type)}); "
        f"installed methods: {_installed()}"
    )


def method_for_config(config: PeftConfig) -> MethodSpec:
    name = method_of(config)
    if not name:
        raise UnknownMethodError(f"{type(config).__name__} names no method: set its class attribute 'method'")
    return method_named(name)


def config_class_named(class_name: str) -> type | None:
    for spec in methods().values():
        if spec.config_class.__name__ == class_name:
            return spec.config_class
    return None


def exported_name(name: str) -> Any | None:
    """The object a method exports under ``name`` (``MethodSpec.exports``: "module:attribute" strings,
    imported only now), or None."""
    import importlib

    for spec in methods().values():
        for target in spec.exports:
            module_name, _, attribute = target.partition(":")
            if attribute == name:
                return getattr(importlib.import_module(module_name), attribute)
    return None


# --- typed hook calls ------------------------------------------------------------------------------
def _hook() -> Any:
    return host().pm.hook


def may_answer(rewrite: str, config: PeftConfig) -> bool:
    """Whether any implementation of the hook behind the facade call ``rewrite`` (one of
    ``REWRITING_HOOKS``) may answer for ``config``: one for its method (``method_impl``), or one for all."""
    method = method_of(config)
    implementations = getattr(_hook(), "peftkit_" + rewrite).get_hookimpls()
    return any(getattr(impl.function, "peftkit_method", method) == method for impl in implementations)


def inject_adapter(peft_model: PeftModel, config: PeftConfig, adapter_name: str) -> bool:
    return bool(
        _hook().peftkit_inject_adapter(peft_model=peft_model, config=config, adapter_name=adapter_name)
    )


def remove_adapter(peft_model: PeftModel, config: PeftConfig, adapter_name: str) -> None:
    _hook().peftkit_remove_adapter(peft_model=peft_model, config=config, adapter_name=adapter_name)


def transform_inputs(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, inputs: dict
) -> dict | None:
    return _hook().peftkit_transform_inputs(
        peft_model=peft_model, config=config, adapter_name=adapter_name, inputs=inputs
    )


def prepare_generation(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, inputs: dict
) -> dict | None:
    return _hook().peftkit_prepare_generation(
        peft_model=peft_model, config=config, adapter_name=adapter_name, inputs=inputs
    )


def prepare_generation_step(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, inputs: dict
) -> dict | None:
    return _hook().peftkit_prepare_generation_step(
        peft_model=peft_model, config=config, adapter_name=adapter_name, model_inputs=inputs
    )


def transform_outputs(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, inputs: dict, outputs: Any
) -> Any | None:
    return _hook().peftkit_transform_outputs(
        peft_model=peft_model, config=config, adapter_name=adapter_name, inputs=inputs, outputs=outputs
    )


def on_optimizer_step(peft_model: PeftModel, config: PeftConfig, adapter_name: str, global_step: int) -> None:
    _hook().peftkit_on_optimizer_step(
        peft_model=peft_model, config=config, adapter_name=adapter_name, global_step=global_step
    )


def initialize_from_data(
    peft_model: PeftModel,
    config: PeftConfig,
    adapter_name: str,
    batches: Any,
    forward: Any,
    show_progress: bool,
    options: dict[str, Any],
) -> bool:
    return bool(
        _hook().peftkit_initialize_from_data(
            peft_model=peft_model,
            config=config,
            adapter_name=adapter_name,
            batches=batches,
            forward=forward,
            show_progress=show_progress,
            options=options,
        )
    )


def trainable_parameters(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str
) -> list[tuple[str, Any]]:
    answers = _hook().peftkit_trainable_parameters(
        peft_model=peft_model, config=config, adapter_name=adapter_name
    )
    return [pair for answer in answers for pair in answer]


def composition_blocks(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, layers: list[AdapterLayer]
) -> frozenset[str]:
    """The blocks the adapter may sit inside; ``layers``: the model's adapter layers, for the default."""
    from peftkit.composition import BLOCK_NAMES

    answer = _hook().peftkit_composition_blocks(
        peft_model=peft_model, config=config, adapter_name=adapter_name
    )
    if answer is None:
        # what every layer holding the adapter computes; Stack alone for an adapter without layers
        blocks = [frozenset(type(layer).composition_blocks) for layer in layers if layer.holds(adapter_name)]
        return frozenset.intersection(*blocks) if blocks else frozenset({"Stack"})
    unknown = set(answer) - set(BLOCK_NAMES)
    if unknown:
        raise TypeError(
            f"the plugin for {method_for_config(config).name!r} names unknown composition blocks {sorted(unknown)}; "
            f"known: {', '.join(BLOCK_NAMES)}"
        )
    return frozenset(answer)


def merge_adapter(peft_model: PeftModel, config: PeftConfig, adapter_name: str) -> bool:
    return bool(
        _hook().peftkit_merge_adapter(peft_model=peft_model, config=config, adapter_name=adapter_name)
    )


def unmerge_adapter(peft_model: PeftModel, config: PeftConfig, adapter_name: str) -> bool:
    return bool(
        _hook().peftkit_unmerge_adapter(peft_model=peft_model, config=config, adapter_name=adapter_name)
    )


def extra_state_dict(peft_model: PeftModel, config: PeftConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for answer in _hook().peftkit_adapter_state_dict(
        peft_model=peft_model, config=config, adapter_name=adapter_name
    ):
        merged.update(answer)
    return merged


def load_extra_state_dict(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> set[str]:
    answers = _hook().peftkit_load_adapter_state_dict(
        peft_model=peft_model, config=config, adapter_name=adapter_name, state_dict=state_dict
    )
    return {key for answer in answers for key in answer}


def prepare_compiled_hotswap(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, target_rank: int | None
) -> bool:
    return bool(
        _hook().peftkit_prepare_compiled_hotswap(
            peft_model=peft_model, config=config, adapter_name=adapter_name, target_rank=target_rank
        )
    )


def layer_features(layer: nn.Module) -> LayerFeatures | None:
    return _hook().peftkit_layer_features(layer=layer)


def read_weight(layer: nn.Module) -> torch.Tensor:
    weight = _hook().peftkit_read_weight(layer=layer)
    if weight is None:
        raise TypeError(f"no installed plugin can read the weight of a {type(layer).__name__} layer")
    return weight


def write_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    if not _hook().peftkit_write_weight(layer=layer, weight=weight):
        raise TypeError(f"no installed plugin can write the weight of a {type(layer).__name__} layer")


def prepare_base_layer(layer: nn.Module) -> None:
    """Let every backend put a base layer in the state adapters need (``peftkit_prepare_base_layer``)."""
    _hook().peftkit_prepare_base_layer(layer=layer)


def dense_layer(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Module | None:
    """A backend's full-precision replacement for a quantized layer; None where the layer is not quantized."""
    return _hook().peftkit_dense_layer(layer=layer, dtype=dtype)


def model_method(name: str) -> Any | None:
    """The function a plugin added to PeftModel under ``name`` (``peftkit_model_methods``), or None."""
    return host().model_methods.get(name)


def read_foreign_adapter(folder: Path, model: nn.Module | None) -> ForeignAdapter | None:
    return _hook().peftkit_read_foreign_adapter(folder=folder, model=model)


def save_foreign_adapter(
    peft_model: PeftModel, config: PeftConfig, adapter_name: str, format: str, folder: Path
) -> bool:
    return bool(
        _hook().peftkit_save_foreign_adapter(
            peft_model=peft_model, config=config, adapter_name=adapter_name, format=format, folder=folder
        )
    )


def register_commands(cli: click.Group) -> list[tuple[str, Exception]]:
    """Let plugins add their subcommands to ``cli``; return each plugin whose hook failed, with its error.

    Asked: the modules of the ``peftkit.commands`` entry-point group, imported on their own, so listing the
    commands (``peftkit --help``) loads no method plugin and no torch; and plugin objects registered in this
    process with :func:`register` (tests, embedding applications). The method plugins of the ``peftkit``
    group are not imported for it. One plugin's failure skips only its own commands.
    """
    pm = pluggy.PluginManager("peftkit")
    pm.add_hookspecs(hookspecs)
    failures: list[tuple[str, Exception]] = []
    candidates: list[tuple[object, str]] = [
        (plugin, origin.name) for plugin, origin in load_entry_points(COMMANDS_ENTRY_POINT_GROUP)[0]
    ]
    if _host is not None:  # never created just for this: that would import every method plugin
        candidates += [
            (plugin, name)
            for name, plugin in _host.pm.list_name_plugin()
            if name not in _host.origins and not name.startswith(BUILTIN_PREFIX)
        ]
    for plugin, name in candidates:
        if pm.is_registered(plugin):
            continue
        try:
            pm.register(plugin, name=name if pm.get_plugin(name) is None else None)
        except Exception as exc:  # a hook with the wrong signature: pluggy's validation error
            failures.append((name, exc))
    # pluggy calls the last registered first; ask in the order found, so a later plugin's command wins
    for impl in reversed(pm.hook.peftkit_register_commands.get_hookimpls()):
        try:
            impl.function(**{arg: cli for arg in impl.argnames})
        except Exception as exc:  # one plugin's bad command must not take the CLI down
            failures.append((impl.plugin_name, exc))
    return failures
