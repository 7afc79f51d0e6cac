"""BitFit's hook implementations: register the method, and put offsets on the layers it targets.

Targets are found here rather than by :func:`peftkit.inject_into_targets`, for two reasons: with
``target_modules=None`` BitFit adapts every layer that has a bias (a rule, not a list of names), and
LayerNorms are no layer kind the core's layer hooks know. Matching itself (names, suffixes, regexes,
``"all-linear"``, ``exclude_modules``, ``modules_to_save``, ``layers_to_transform``) is the core's.
"""

from __future__ import annotations

from peftkit import AdapterLayer, MethodSpec, TargetModulesError, hookimpl, method_impl
from peftkit.injection import ALL_LINEAR, candidate_modules, find_targets, is_target
from peftkit.modules_to_save import ModulesToSaveWrapper
from peftkit.plugins import layer_features
from torch import nn

from peftkit_bitfit.config import BitFitConfig
from peftkit_bitfit.layer import BitFitLayer, BitFitLayerNorm, has_bias

ADAPTS = "Linear, Conv1d/2d/3d and transformers' Conv1D layers that have a bias"


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [MethodSpec(name="bitfit", config_class=BitFitConfig, peft_type="BITFIT", family="bias-only")]


@method_impl("bitfit")
def peftkit_inject_adapter(peft_model, config: BitFitConfig, adapter_name: str) -> bool:
    model = peft_model.base_model.model
    bias_paths = bias_layer_targets(model, config)
    norm_paths = layer_norm_targets(model, config) if config.train_layer_norm else []
    if not bias_paths and not norm_paths:
        raise TargetModulesError(_nothing_to_train(model, config))
    for path in bias_paths:
        _add_to(model, path, BitFitLayer, config, adapter_name)
    for path in norm_paths:
        _add_to(model, path, BitFitLayerNorm, config, adapter_name)
    return True


# --- which modules --------------------------------------------------------------------------------
def _innermost(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, AdapterLayer) else module


def _is_layer_norm(module: nn.Module) -> bool:
    """A LayerNorm BitFit can offset: nn.LayerNorm's own forward (F.layer_norm), with a weight."""
    if isinstance(module, BitFitLayerNorm):
        return True
    return (
        isinstance(module, nn.LayerNorm)
        and type(module).forward is nn.LayerNorm.forward
        and module.elementwise_affine
    )


def _why_not_offsettable(module: nn.Module) -> str | None:
    """Why BitFit cannot offset this module's bias, or None when it can."""
    if isinstance(module, ModulesToSaveWrapper):
        return "it is a module trained in full through modules_to_save"
    inner = _innermost(module)
    features = layer_features(inner)
    if features is None or features.kind not in BitFitLayer.supported_kinds:
        kind = features.kind if features else type(inner).__name__
        return f"BitFit does not adapt {kind} layers; it adapts {ADAPTS}"
    if not has_bias(inner):
        return f"its {type(inner).__name__} has no bias, and BitFit only offsets biases a layer has"
    return None


def _in_scope(model: nn.Module, config: BitFitConfig) -> list[tuple[str, nn.Module]]:
    """Every module outside exclude_modules and modules_to_save, and in layers_to_transform if set."""
    candidates = candidate_modules(model)
    every_path = {path for path, _ in candidates}
    return [(path, module) for path, module in candidates if is_target(path, config, every_path)]


def bias_layer_targets(model: nn.Module, config: BitFitConfig) -> list[str]:
    """The paths of the layers whose bias gets an offset.

    None: every layer BitFit can offset. ``"all-linear"``: those of PEFT's all-linear layers that have a
    bias. Names or a regex: what they match, each of which must be a layer with a bias (a LayerNorm
    only with train_layer_norm, which adapts it with the other LayerNorms).
    """
    if config.target_modules is None:
        return [path for path, module in _in_scope(model, config) if _why_not_offsettable(module) is None]
    matched = find_targets(model, config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        return [path for path in matched if has_bias(_innermost(model.get_submodule(path)))]
    paths = []
    for path in matched:
        module = model.get_submodule(path)
        if _is_layer_norm(module):
            if config.train_layer_norm:
                continue
            raise TargetModulesError(
                f"BitFitConfig.target_modules matched {path!r}, a LayerNorm: BitFit offsets LayerNorms (weight "
                "and bias) with train_layer_norm=True, which adapts every LayerNorm"
            )
        reason = _why_not_offsettable(module)
        if reason is not None:
            raise TargetModulesError(f"BitFitConfig.target_modules matched {path!r}, but {reason}")
        paths.append(path)
    return paths


def layer_norm_targets(model: nn.Module, config: BitFitConfig) -> list[str]:
    """The paths of every LayerNorm in scope (train_layer_norm adapts them whatever target_modules says)."""
    return [path for path, module in _in_scope(model, config) if _is_layer_norm(module)]


def _nothing_to_train(model: nn.Module, config: BitFitConfig) -> str:
    where = type(model).__name__
    message = (
        f"BitFitConfig(target_modules={config.target_modules!r}) found nothing to train in {where}: it has no "
        f"{ADAPTS} among the modules in scope (outside exclude_modules and modules_to_save"
        + (", in layers_to_transform" if config.layers_to_transform is not None else "")
        + ")"
    )
    if config.train_layer_norm:
        return message + ", and no nn.LayerNorm"
    if any(_is_layer_norm(module) for _, module in _in_scope(model, config)):
        return message + "; it has LayerNorms: set train_layer_norm=True to train those"
    return message


def _add_to(
    model: nn.Module, path: str, layer_class: type[AdapterLayer], config: BitFitConfig, adapter_name: str
) -> None:
    """Add the adapter's offsets at ``path``, wrapping the module in ``layer_class`` the first time."""
    module = model.get_submodule(path)
    training = module.training
    if not isinstance(module, layer_class):
        module = layer_class(module)
        model.set_submodule(path, module)
    module.update_layer(adapter_name, config, path)
    module.train(training)
