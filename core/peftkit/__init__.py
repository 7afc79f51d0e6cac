"""peftkit: parameter-efficient fine-tuning with methods as plugins.

Importing this package loads nothing: names resolve on first use, and plugins are discovered by the
first call that needs them. Method configs (``LoraConfig``, ...) are re-exported from their plugins, and
so are the names a method lists in its ``MethodSpec.exports`` (LoRA's ``EvaConfig``,
``initialize_lora_eva_weights``, ...), as PEFT exports them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.8.1"

_EXPORTS = {
    "get_peft_model": "peftkit.model",
    "PeftModel": "peftkit.model",
    "load_config": "peftkit.serialization",
    "PeftConfig": "peftkit.config",
    "TaskType": "peftkit.config",
    "MethodSpec": "peftkit.method",
    "method_impl": "peftkit.method",
    "hookimpl": "peftkit.method",
    "AdapterLayer": "peftkit.adapter_layer",
    "LayerFeatures": "peftkit.layer_access",
    "inject_into_targets": "peftkit.injection",
    "prepare_model_for_kbit_training": "peftkit.kbit",
    "hotswap_adapter": "peftkit.hotswap",
    "initialize_from_data": "peftkit.data_init",
    "prepare_model_for_compiled_hotswap": "peftkit.hotswap",
    "Stack": "peftkit.composition",
    "Parallel": "peftkit.composition",
    "BatchSplit": "peftkit.composition",
    "Average": "peftkit.composition",
    "Split": "peftkit.composition",
    "MultiTask": "peftkit.composition",
    "Fuse": "peftkit.composition",
    "PeftkitError": "peftkit.errors",
    "ConfigError": "peftkit.errors",
    "TargetModulesError": "peftkit.errors",
    "AdapterLoadError": "peftkit.errors",
    "UnknownMethodError": "peftkit.errors",
    "MergeNotSupportedError": "peftkit.errors",
    "PluginConflictError": "peftkit.errors",
    "AdapterNameError": "peftkit.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name.endswith("Config"):
        from peftkit import plugins

        config_class = plugins.config_class_named(name)
        if config_class is not None:
            return config_class
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is None:  # not a submodule
        exported = importlib.import_module("peftkit.plugins").exported_name(name)
        if exported is not None:
            return exported
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
