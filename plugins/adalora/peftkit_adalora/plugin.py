"""AdaLoRA's hook implementations: register, inject, allocate ranks at each optimizer step, regularise."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit import ConfigError, MethodSpec, hookimpl, method_impl
from peftkit.bias_option import bias_hooks
from peftkit.method import method_of

from peftkit_adalora.config import AdaLoraConfig

if TYPE_CHECKING:
    import torch

    from peftkit_adalora.layer import AdaLoraLayer

# PEFT's default targets for AdaLoRA when target_modules is None, by transformers model_type.
DEFAULT_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    return [
        MethodSpec(name="adalora", config_class=AdaLoraConfig, peft_type="ADALORA", family="weight-delta")
    ]


def _layers(peft_model, adapter_name: str) -> list[tuple[str, AdaLoraLayer]]:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_adalora.layer import AdaLoraLayer

    return [
        (path, layer)
        for path, layer in peft_model.adapter_layers()
        if isinstance(layer, AdaLoraLayer) and layer.holds(adapter_name)
    ]


def _check_one_trainable(peft_model, config: AdaLoraConfig, adapter_name: str) -> None:
    """PEFT's rule: one AdaLoRA adapter trains (its allocator owns the ranks); others load for inference."""
    if config.inference_mode:
        return
    trainable = [
        name
        for name, other in peft_model.peft_config.items()
        if name != adapter_name and method_of(other) == "adalora" and not other.inference_mode
    ]
    if trainable:
        raise ConfigError(
            f"AdaLoRA supports only one trainable adapter per model, and {trainable[0]!r} is trainable; "
            f"add {adapter_name!r} with inference_mode=True (or load it without is_trainable)"
        )


@method_impl("adalora")
def peftkit_inject_adapter(peft_model, config: AdaLoraConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit.injection import fill_default_targets, inject_into_targets

    from peftkit_adalora.layer import AdaLoraLayer

    _check_one_trainable(peft_model, config, adapter_name)
    fill_default_targets(peft_model, config, DEFAULT_TARGETS)
    inject_into_targets(peft_model, config, adapter_name, AdaLoraLayer)
    return True


@method_impl("adalora")
def peftkit_on_optimizer_step(peft_model, config: AdaLoraConfig, adapter_name: str, global_step: int) -> None:
    if config.inference_mode:
        return None
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_adalora import allocation

    allocation.update_and_allocate(_layers(peft_model, adapter_name), config, adapter_name, global_step)
    return None


def orthogonality_regularizer(peft_model, adapter_name: str) -> torch.Tensor:
    """PEFT's regulariser: the mean over the adapter's P and Q factors of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F."""
    import torch  # here, not at the top: loading the plugin (peftkit methods) stays torch-free

    penalties = [
        penalty
        for _, layer in _layers(peft_model, adapter_name)
        for penalty in layer.orthogonality_penalties(adapter_name)
    ]
    return torch.stack(penalties).mean()


@method_impl("adalora")
def peftkit_transform_outputs(peft_model, config: AdaLoraConfig, adapter_name: str, inputs, outputs):
    import torch  # here, not at the top: loading the plugin (peftkit methods) stays torch-free

    loss = getattr(outputs, "loss", None)
    if not (peft_model.training and not config.inference_mode and isinstance(loss, torch.Tensor)):
        return None
    if config.orth_reg_weight == 0:
        return None
    regularizer = orthogonality_regularizer(peft_model, adapter_name)
    outputs.loss = loss + config.orth_reg_weight * regularizer.to(loss.dtype)
    return outputs


# --- biases (PEFT's ``bias`` field, as for LoRA): which base-model biases train, save and load with it ----
peftkit_trainable_parameters, peftkit_adapter_state_dict, peftkit_load_adapter_state_dict = bias_hooks(
    "adalora", "peftkit_adalora.layer:AdaLoraLayer"
)
