"""LoHa's hook implementations: register the method and inject its layers into the targeted modules."""

from __future__ import annotations

from peftkit import MethodSpec, TargetModulesError, hookimpl, method_impl
from peftkit.layer_access import LINEAR
from peftkit.plugins import layer_features

from peftkit_loha.config import LoHaConfig

# PEFT's default targets when target_modules is None, by transformers model_type (PEFT copies LoRA's).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}

ADAPTS = "nn.Linear, nn.Conv1d and nn.Conv2d layers, as PEFT's LoHa does"


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [MethodSpec(name="loha", config_class=LoHaConfig, peft_type="LOHA", family="weight-delta")]


@method_impl("loha")
def peftkit_inject_adapter(peft_model, config: LoHaConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit.injection import fill_default_targets, inject_into_targets

    from peftkit_loha.layer import LoHaLayer

    model = peft_model.base_model.model
    fill_default_targets(peft_model, config, DEFAULT_TARGETS)
    _check_targets(model, config)
    inject_into_targets(peft_model, config, adapter_name, LoHaLayer)
    return True


def _check_targets(model, config: LoHaConfig) -> None:
    """Refuse every unsupported target before any layer is wrapped, so a failure leaves the model as it was."""
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit import AdapterLayer
    from peftkit.injection import find_targets

    from peftkit_loha.layer import LoHaLayer

    for path in find_targets(model, config):
        module = model.get_submodule(path)
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        features = layer_features(base)
        if features is None or features.kind not in LoHaLayer.supported_kinds:
            kind = features.kind if features else type(base).__name__
            raise TargetModulesError(
                f"module {path!r} matched target_modules, but LoHa adapts only {ADAPTS} (its kind: {kind})"
            )
        if features.kind == LINEAR and features.fan_in_fan_out:
            # PEFT's LoHa has no transposed-weight path: an adapter on it could not load in PEFT
            raise TargetModulesError(
                f"module {path!r} matched target_modules, but it is a {type(base).__name__} (weight stored "
                f"in × out, as GPT-2's); LoHa adapts only {ADAPTS}"
            )
