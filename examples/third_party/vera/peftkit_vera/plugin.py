"""VeRA's hook implementations, written against peftkit's documented hooks only.

- ``peftkit_register_methods``: the method, under PEFT's ``peft_type`` ``VERA``.
- ``peftkit_inject_adapter``: wrap the targets (``inject_into_targets``), then draw the adapter's
  shared A and B, sized to the largest targeted layer, and hand the one pair to every layer.
- ``peftkit_adapter_state_dict`` / ``peftkit_load_adapter_state_dict``: A and B live outside the
  layers, so they are saved and loaded here, under PEFT's keys ``base_model.vera_A`` and
  ``base_model.vera_B`` (only with ``save_projection=True``; otherwise the key redraws them).

The per-layer vectors train, save, load, merge and delete through the core's AdapterLayer defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import AdapterLoadError, MethodSpec, hookimpl, method_impl

from peftkit_vera.config import VeraConfig

if TYPE_CHECKING:
    import torch

    from peftkit_vera.layer import VeraLayer, VeraProjections

PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


def layers_holding(peft_model, adapter_name: str) -> list[VeraLayer]:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_vera.layer import VeraLayer

    return [
        module
        for module in peft_model.base_model.model.modules()
        if isinstance(module, VeraLayer) and module.holds(adapter_name)
    ]


def shared_projections(peft_model, adapter_name: str) -> VeraProjections:
    return layers_holding(peft_model, adapter_name)[0].vera_projections[adapter_name]


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [MethodSpec(name="vera", config_class=VeraConfig, peft_type="VERA", family="weight-delta")]


@method_impl("vera")
def peftkit_inject_adapter(peft_model, config: VeraConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit import inject_into_targets

    from peftkit_vera.layer import VeraLayer, VeraProjections

    inject_into_targets(peft_model, config, adapter_name, VeraLayer)
    layers = layers_holding(peft_model, adapter_name)
    largest_in = max(layer.features.in_features for layer in layers)
    largest_out = max(layer.features.out_features for layer in layers)
    projections = VeraProjections(config.r, largest_in, largest_out, config.projection_prng_key)
    projections.to(layers[0].vera_lambda_b[adapter_name].device)
    for layer in layers:
        layer.share_projections(adapter_name, projections)
    return True


@method_impl("vera")
def peftkit_adapter_state_dict(peft_model, config: VeraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    if not config.save_projection:
        return {}
    projections = shared_projections(peft_model, adapter_name)
    return {key: getattr(projections, name) for name, key in PROJECTION_KEYS.items()}


@method_impl("vera")
def peftkit_load_adapter_state_dict(
    peft_model, config: VeraConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> list[str]:
    present = [key for key in PROJECTION_KEYS.values() if key in state_dict]
    if not present:
        if config.save_projection:
            raise AdapterLoadError(
                "the VeRA adapter file has no 'base_model.vera_A'/'base_model.vera_B', though its config "
                "says save_projection=True"
            )
        return []  # drawn again from projection_prng_key at injection
    import torch  # here, not at the top: loading the plugin (peftkit methods) stays torch-free

    projections = shared_projections(peft_model, adapter_name)
    for name, key in PROJECTION_KEYS.items():
        if key not in state_dict:
            raise AdapterLoadError(f"the VeRA adapter file has {present[0]!r} but no {key!r}")
        target, saved = getattr(projections, name), state_dict[key]
        if tuple(saved.shape) != tuple(target.shape):
            raise AdapterLoadError(
                f"tensor {key!r} has shape {tuple(saved.shape)} in the adapter file but {tuple(target.shape)} "
                "in the model: the adapter was made for a base model of another size or another r"
            )
        with torch.no_grad():
            target.copy_(saved)
    return present
