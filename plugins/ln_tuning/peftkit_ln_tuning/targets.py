"""Which modules get LN tuning copies, and putting them there."""

from __future__ import annotations

from peftkit import AdapterLayer, TargetModulesError
from peftkit.injection import find_targets, logical_path
from torch import nn

from peftkit_ln_tuning.config import LNTuningConfig
from peftkit_ln_tuning.layer import LNTuningLayer


def add_copies(model: nn.Module, config: LNTuningConfig, adapter_name: str) -> None:
    """Give every module the config targets in ``model`` a trainable copy for ``adapter_name``."""
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        _check_copyable(path, module)
        training = module.training
        if not isinstance(module, LNTuningLayer):
            module = LNTuningLayer(module)
            model.set_submodule(path, module)
        module.update_layer(adapter_name, config, logical_path(path))
        module.train(training)


def _check_copyable(path: str, module: nn.Module) -> None:
    if isinstance(module, LNTuningLayer):
        return
    if isinstance(module, AdapterLayer):
        raise TargetModulesError(
            f"LNTuningConfig.target_modules matched {path!r}, which another method's adapter "
            f"({type(module).__name__}) already wraps; LN tuning copies the module it targets, so add the LN "
            "tuning adapter first, or leave this module out with exclude_modules"
        )
    if any(isinstance(inner, AdapterLayer) for inner in module.modules()):
        raise TargetModulesError(
            f"LNTuningConfig.target_modules matched {path!r}, a {type(module).__name__} that holds another "
            "method's adapter layers; LN tuning copies the module it targets whole: target the norm layers "
            "inside it instead"
        )
    if next(module.parameters(), None) is None:
        raise TargetModulesError(
            f"LNTuningConfig.target_modules matched {path!r}, a {type(module).__name__} without parameters, so "
            "its copy would have nothing to train; target norm layers (LayerNorm, RMSNorm)"
        )
