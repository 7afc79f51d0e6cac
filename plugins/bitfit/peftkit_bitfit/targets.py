"""Which modules BitFit offsets, and putting its offsets there.

Targets are found here rather than by :func:`peftkit.inject_into_targets`, for two reasons: with
``target_modules=None`` BitFit adapts every module that has a bias (a rule, not a list of names), and
norm layers are no layer kind the core's layer hooks know. Matching itself (names, suffixes, regexes,
``"all-linear"``, ``exclude_modules``, ``modules_to_save``, ``layers_to_transform``) is the core's.
"""

from __future__ import annotations

import warnings

from peftkit import AdapterLayer, TargetModulesError
from peftkit.injection import ALL_LINEAR, candidate_modules, find_targets, is_target, logical_path
from peftkit.modules_to_save import ModulesToSaveWrapper
from peftkit.plugins import layer_features
from torch import nn

from peftkit_bitfit.config import BitFitConfig
from peftkit_bitfit.layer import (
    BitFitChannelNorm,
    BitFitLayer,
    BitFitLayerNorm,
    has_bias,
    is_channel_norm,
    is_layer_norm,
)

ADAPTS = (
    "Linear, Conv1d/2d/3d and transformers' Conv1D layers, LayerNorm, GroupNorm, BatchNorm and InstanceNorm"
)
SHOWN = 5  # biases named in a message; the rest are counted


def add_offsets(model: nn.Module, config: BitFitConfig, adapter_name: str) -> None:
    """Put the adapter's offsets on every module the config targets in ``model``."""
    targets = bitfit_targets(model, config)
    if not targets:
        raise TargetModulesError(_nothing_to_train(model, config))
    if config.target_modules is None:
        _warn_untrained(model, config, targets)
    for path, layer_class in targets.items():
        _add_to(model, path, layer_class, config, adapter_name)


# --- which modules --------------------------------------------------------------------------------
def _innermost(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, AdapterLayer) else module


def _layer_class(layer: nn.Module) -> type[AdapterLayer] | None:
    """The BitFit layer that offsets this (innermost) layer's tensors, or None for a kind BitFit cannot."""
    if is_layer_norm(layer):
        return BitFitLayerNorm
    if is_channel_norm(layer):
        return BitFitChannelNorm
    features = layer_features(layer)
    if features is not None and features.kind in BitFitLayer.supported_kinds:
        return BitFitLayer
    return None


def _never_called(model: nn.Module) -> set[int]:
    """Layers whose parent computes with their tensors without calling them: an offset there would do
    nothing. nn.MultiheadAttention passes ``out_proj.weight`` and ``out_proj.bias`` to a functional call."""
    return {
        id(_innermost(module.out_proj))
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def _why_not_offsettable(module: nn.Module, config: BitFitConfig, never_called: set[int]) -> str | None:
    """Why BitFit cannot offset this module's bias (or, with train_layer_norm, LayerNorm weight), or None."""
    if isinstance(module, ModulesToSaveWrapper):
        return "it is a module trained in full through modules_to_save"
    inner = _innermost(module)
    layer_class = _layer_class(inner)
    if layer_class is None:
        features = layer_features(inner)
        kind = features.kind if features else type(inner).__name__
        return f"BitFit does not adapt {kind} layers; it adapts {ADAPTS}"
    if id(inner) in never_called:
        return (
            "nn.MultiheadAttention computes with its out_proj's weight and bias without calling the layer, "
            "so an offset there would change nothing"
        )
    if not has_bias(inner):
        if layer_class is not BitFitLayerNorm:
            return f"its {type(inner).__name__} has no bias, and BitFit only offsets biases a layer has"
        if not config.train_layer_norm:
            return "its LayerNorm has no bias; set train_layer_norm=True to train its weight"
    return None


def _in_scope(model: nn.Module, config: BitFitConfig) -> list[tuple[str, nn.Module]]:
    """Every module outside exclude_modules and modules_to_save, and in layers_to_transform if set."""
    candidates = candidate_modules(model)
    every_path = {path for path, _ in candidates}
    return [(path, module) for path, module in candidates if is_target(path, config, every_path)]


def bitfit_targets(model: nn.Module, config: BitFitConfig) -> dict[str, type[AdapterLayer]]:
    """The paths of the layers that get offsets, in the model's order, each with the BitFit layer for it.

    None: every module in scope with a bias BitFit can offset. ``"all-linear"``: those of PEFT's
    all-linear layers that have a bias. Names or a regex: what they match, each of which must have a bias
    BitFit can offset. With train_layer_norm, every LayerNorm in scope too (weight and bias), whatever
    target_modules says.
    """
    never_called = _never_called(model)
    scope = _in_scope(model, config)
    if config.target_modules is None:
        chosen = {
            path for path, module in scope if _why_not_offsettable(module, config, never_called) is None
        }
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        chosen = set()
        for path in find_targets(model, config):
            inner = _innermost(model.get_submodule(path))
            if has_bias(inner) and id(inner) not in never_called:
                chosen.add(path)
    else:
        chosen = set()
        for path in find_targets(model, config):
            reason = _why_not_offsettable(model.get_submodule(path), config, never_called)
            if reason is not None:
                raise TargetModulesError(f"BitFitConfig.target_modules matched {path!r}, but {reason}")
            chosen.add(path)
    if config.train_layer_norm:
        chosen |= {path for path, module in scope if is_layer_norm(_innermost(module))}
    return {
        path: _layer_class(_innermost(module)) for path, module in candidate_modules(model) if path in chosen
    }


def untrained_biases(
    model: nn.Module, config: BitFitConfig, targets: dict[str, type[AdapterLayer]]
) -> list[tuple[str, str, int]]:
    """The bias parameters in scope that no target offsets, each tensor once: (name, kind of the module
    holding it, number of values).

    A bias is a parameter whose name ends with "bias", the usual recipe's rule; modules trained in full
    through modules_to_save are out of scope.
    """
    covered = {id(_innermost(model.get_submodule(path)).bias) for path in targets}
    seen: set[int] = set()
    out = []
    for path, module in _in_scope(model, config):
        if isinstance(module, ModulesToSaveWrapper):
            continue
        inner = _innermost(module)
        for name, param in inner.named_parameters(recurse=False):
            if name.endswith("bias") and id(param) not in covered and id(param) not in seen:
                seen.add(id(param))
                out.append((f"{logical_path(path)}.{name}", type(inner).__name__, param.numel()))
    return out


def _listed(biases: list[tuple[str, str, int]]) -> str:
    shown = ", ".join(f"{name!r} ({kind})" for name, kind, _ in biases[:SHOWN])
    return shown + (f" and {len(biases) - SHOWN} more" if len(biases) > SHOWN else "")


def _warn_untrained(model: nn.Module, config: BitFitConfig, targets: dict[str, type[AdapterLayer]]) -> None:
    untrained = untrained_biases(model, config, targets)
    if untrained:
        values = sum(numel for _, _, numel in untrained)
        warnings.warn(
            f"BitFitConfig(target_modules=None) trains no offset for {len(untrained)} biases ({values:,} values) "
            f"in modules BitFit cannot offset: {_listed(untrained)}. BitFit offsets the biases of {ADAPTS}; "
            "leave those modules out with exclude_modules, or train them in full with modules_to_save",
            UserWarning,
            stacklevel=2,
        )


def _nothing_to_train(model: nn.Module, config: BitFitConfig) -> str:
    head = f"BitFitConfig(target_modules={config.target_modules!r}) found nothing to train in {type(model).__name__}"
    scope = "outside exclude_modules and modules_to_save" + (
        ", in layers_to_transform" if config.layers_to_transform is not None else ""
    )
    in_scope = _in_scope(model, config)
    never_called = _never_called(model)
    if any(_why_not_offsettable(module, config, never_called) is None for _, module in in_scope):
        # only "all-linear" gets here with offsettable modules left: named targets are checked one by one
        return (
            f"{head}: none of the modules target_modules selects ({scope}) has a bias; target_modules=None "
            "offsets every bias BitFit can, LayerNorms' included"
        )
    untrained = untrained_biases(model, config, {})
    if untrained:
        return (
            f"{head}: its biases ({scope}) are all in modules BitFit cannot offset: {_listed(untrained)}; "
            f"it offsets the biases of {ADAPTS}"
        )
    if any(is_layer_norm(_innermost(module)) for _, module in in_scope) and not config.train_layer_norm:
        return (
            f"{head}: no module in scope ({scope}) has a bias; its LayerNorms have a weight: set "
            "train_layer_norm=True to train those"
        )
    return (
        f"{head}: no module in scope ({scope}) has a bias, and BitFit trains biases only; a model without "
        "biases (Llama, Mistral and T5 have none) needs a method that adapts weights, such as LoRA"
    )


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
