"""Finding the modules a config targets, and wrapping them in a method's adapter layers."""

from __future__ import annotations

import contextlib
import difflib
import re
from typing import Any

import torch
from torch import nn

from peftkit import plugins
from peftkit.adapter_layer import AdapterLayer
from peftkit.config import TASK_HEADS, TaskType
from peftkit.errors import TargetModulesError
from peftkit.layer_access import LINEAR
from peftkit.modules_to_save import matches_module_to_save

ALL_LINEAR = "all-linear"


def logical_path(path: str) -> str:
    """A module's path in the base model as it was before any adapter wrapped it (no ``.base_layer``)."""
    return re.sub(r"\.base_layer(?=\.|$)", "", path)


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules an adapter may target, outermost wrapper first, with their paths in ``model``.

    An adapter layer stands for the module it wraps; its own adapter modules are not candidates, but the
    insides of a wrapped block are (LoRA may target ``q_proj`` inside an attention block that a
    bottleneck adapter wraps). Targets are matched on :func:`logical_path`.
    """
    out: list[tuple[str, nn.Module]] = []
    hidden: list[str] = []  # adapter layers' own submodules
    wrapped: set[str] = set()  # base layers, represented by the adapter layer around them
    for path, module in model.named_modules():
        if not path or any(path == h or path.startswith(h + ".") for h in hidden):
            continue
        if path not in wrapped:
            out.append((path, module))
        if isinstance(module, AdapterLayer):
            wrapped.add(f"{path}.base_layer")
            hidden += [f"{path}.{name}" for name, _ in module.named_children() if name != "base_layer"]
    return out


def _innermost(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, AdapterLayer) else module


def _all_linear_names(model: nn.Module, config: Any) -> set[str]:
    """PEFT's "all-linear": every linear layer but the output head (and a classifier head for SEQ_CLS)."""
    names, paths = set(), []
    for path, module in candidate_modules(model):
        paths.append(path)
        features = plugins.layer_features(_innermost(module))
        if features is not None and features.kind == LINEAR:
            names.add(path)
    excluded = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        excluded |= {path for path, module in model.named_modules() if module is output}
    elif getattr(config, "task_type", None) == TaskType.SEQ_CLS:
        excluded |= {path for path in names if path.split(".")[-1] in TASK_HEADS[TaskType.SEQ_CLS]}
    chosen = names - excluded
    short = {path.split(".")[-1] for path in chosen}
    # a last name that also ends the path of a module left out would select it too (diffusers' "to_out.0"
    # beside the block "down_blocks.0"): the layers of such a name are named by their whole paths
    ambiguous = short & {path.split(".")[-1] for path in paths if path not in chosen}
    return (short - ambiguous) | {path for path in chosen if path.split(".")[-1] in ambiguous}


def _layer_index(path: str, layers_pattern: Any) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match.group("idx")) if match else None


def _matches(path: str, spec: Any) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return path in spec or any(path.endswith("." + name) for name in spec)


def is_target(path: str, config: Any, target_modules: Any) -> bool:
    """PEFT's matching: exclude_modules and modules_to_save first, then target_modules, then layer indices."""
    path = logical_path(path)
    exclude = getattr(config, "exclude_modules", None)
    if exclude and _matches(path, exclude):
        return False
    if config.modules_to_save and matches_module_to_save(path, config.modules_to_save):
        return False
    if not _matches(path, target_modules):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if isinstance(target_modules, str) or layers is None or layers == []:
        return True
    index = _layer_index(path, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def resolved_targets(model: nn.Module, config: Any) -> Any:
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return _all_linear_names(model, config)
    return targets


def find_targets(model: nn.Module, config: Any) -> list[str]:
    """The paths of the modules ``config.target_modules`` selects, with a helpful error when there are none."""
    targets = resolved_targets(model, config)
    found = [path for path, _ in candidate_modules(model) if is_target(path, config, targets)]
    if not found:
        raise TargetModulesError(_no_match_message(model, config, targets))
    return found


def _no_match_message(model: nn.Module, config: Any, targets: Any) -> str:
    adaptable = sorted(
        {
            path.split(".")[-1]
            for path, module in candidate_modules(model)
            if plugins.layer_features(_innermost(module)) is not None
        }
    )
    asked = [targets] if isinstance(targets, str) else list(targets)
    hints = []
    for name in asked:
        close = difflib.get_close_matches(name.split(".")[-1], adaptable, n=3, cutoff=0.5)
        if close:
            hints.append(f"{name!r}: did you mean {', '.join(repr(c) for c in close)}?")
    message = (
        f"{type(config).__name__}.target_modules={config.target_modules!r} matched no module of "
        f"{type(model).__name__}."
    )
    if hints:
        message += " Closest names: " + "; ".join(hints)
    if adaptable:
        message += f" Layer names in this model that can be targeted: {', '.join(adaptable)}."
    return message


def fill_default_targets(peft_model: Any, config: Any, defaults: dict[str, list[str]]) -> None:
    """When ``config.target_modules`` is None, set it from ``defaults`` (PEFT's table for the method) by the
    base model's ``config.model_type``; an architecture the table lacks is an error asking for names."""
    if config.target_modules is not None:
        return
    model_type = getattr(getattr(peft_model.base_model.model, "config", None), "model_type", None)
    if model_type not in defaults:
        spec = plugins.method_for_config(config)
        package = spec.distribution or f"the {spec.name} plugin"
        diffusers = type(peft_model.base_model.model).__module__.startswith("diffusers.")
        example = ["to_q", "to_k", "to_v", "to_out.0"] if diffusers else ["q_proj", "v_proj"]
        raise TargetModulesError(
            f"{type(config).__name__}.target_modules is None and {package} has no default for model_type "
            f"{model_type!r}; name the modules to adapt (e.g. target_modules={example!r})"
        )
    config.target_modules = list(defaults[model_type])


def inject_into_targets(
    peft_model: Any, config: Any, adapter_name: str, layer_class: type[AdapterLayer]
) -> list[str]:
    """Add the adapter to every targeted module, wrapping it in ``layer_class`` the first time.

    A module already wrapped by ``layer_class`` (another adapter of the same method) gets the new
    adapter in place; a module wrapped by another method's layer is wrapped once more.
    """
    model = peft_model.base_model.model
    paths = find_targets(model, config)
    for path in paths:
        module = model.get_submodule(path)
        training = module.training
        if not isinstance(module, layer_class):
            features = plugins.layer_features(_innermost(module))
            if features is None or features.kind not in layer_class.supported_kinds:
                kind = (
                    features.kind
                    if features
                    else f"{type(_innermost(module)).__name__} (unknown to the layer hooks)"
                )
                raise TargetModulesError(
                    f"module {path!r} matched target_modules, but {config.method} cannot adapt a {kind} layer; "
                    f"it adapts: {', '.join(layer_class.supported_kinds)}"
                )
            module = layer_class(module, features)
            model.set_submodule(path, module)
        with _creating_on(module.get_base_layer()):
            module.update_layer(adapter_name, config, logical_path(path))
        # new submodules (dropout) start in training mode: give them the mode of the layer they adapt
        module.train(training)
    return paths


def _creating_on(base_layer: nn.Module) -> contextlib.AbstractContextManager:
    """On a meta-device base (a model laid out without weights), adapter tensors are made on the meta
    device too: no memory, no initialisation work. Elsewhere they are made on the CPU and moved, so
    that seeded initialisation draws the same numbers as PEFT's."""
    weight = next(base_layer.parameters(), None)
    return torch.device("meta") if weight is not None and weight.is_meta else contextlib.nullcontext()
