"""Quantized (k-bit) base models: getting one ready to train, and turning its layers back to full precision.

Which layers are quantized is the layer hooks' answer (``LayerFeatures.quantized``), so the core names no
quantization library: a backend plugin such as ``peftkit-bnb`` teaches it the layer types.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from peftkit import plugins
from peftkit.adapter_layer import AdapterLayer

# Quantization methods whose packed parameters must not be cast, as PEFT lists them.
_NO_UPCAST_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's base layers that a backend reports as quantized, with their paths."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            continue
        features = plugins.layer_features(module)
        if features is not None and features.quantized:
            found.append((path, module))
    return found


def _is_loaded_in_kbit(model: nn.Module, quantized: list[tuple[str, nn.Module]]) -> bool:
    flags = ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")
    return any(getattr(model, flag, False) for flag in flags) or bool(quantized)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Make a quantized transformers model ready for adapter training, as PEFT's function of this name does.

    Call it on the base model, before ``get_peft_model``. It freezes every parameter; casts the float16 and
    bfloat16 parameters that are not quantized weights (norms, embeddings, the head) to float32, for stable
    training; and, for a quantized model with ``use_gradient_checkpointing``, makes the input embeddings'
    output require grad (so checkpointed blocks of a frozen model still pass gradients to the adapters) and
    turns on gradient checkpointing with ``gradient_checkpointing_kwargs``.

    :return: the same model, changed in place.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    quantized = quantized_layers(model)
    for param in model.parameters():
        param.requires_grad = False

    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod is a str enum
    if method not in _NO_UPCAST_METHODS and not getattr(model, "hqq_quantized", False):
        packed = {id(getattr(layer, "weight", None)) for _, layer in quantized}
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and id(param) not in packed:
                param.data = param.data.to(torch.float32)

    if _is_loaded_in_kbit(model, quantized) and use_gradient_checkpointing:
        # with use_reentrant=False checkpointing passes gradients without inputs that require them
        if kwargs.get("use_reentrant", True):
            _make_inputs_require_grad(model)
        _enable_checkpointing(model, kwargs)
    return model


def _enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """transformers 5 names it activation checkpointing; older versions gradient checkpointing."""
    if hasattr(model, "activation_checkpointing_enable"):
        # None lets transformers choose (non-reentrant), where {} would leave torch's deprecated default
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
        return
    enable = model.gradient_checkpointing_enable
    if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
        enable(gradient_checkpointing_kwargs=kwargs)
        return
    if kwargs:
        warnings.warn(
            f"this model's gradient_checkpointing_enable takes no gradient_checkpointing_kwargs; ignoring {sorted(kwargs)}",
            UserWarning,
            stacklevel=3,
        )
    enable()


def _make_inputs_require_grad(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return

    def require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(require_grad)


def dequantize_base_layers(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every quantized base layer by its backend's full-precision equivalent (``peftkit_dense_layer``).

    Layers inside adapter layers are replaced too, so adapters merged afterwards merge into dense weights.
    A transformers model's quantization settings are removed once it holds no quantized layer, so that it
    saves and loads as a plain model.

    :param dtype: the dtype of the new layers; None for each layer's compute dtype.
    :return: how many layers were replaced.
    """
    replaced = 0
    for path, layer in quantized_layers(model):
        dense = plugins.dense_layer(layer, dtype)
        if dense is not None:
            model.set_submodule(path, dense)
            replaced += 1
    if replaced and not quantized_layers(model):
        _forget_quantization(model)
    return replaced


def _forget_quantization(model: nn.Module) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
