"""The AdaLoRA layer's math, the orthogonality regulariser, and PEFT's one-trainable-adapter rule."""

from __future__ import annotations

import peftkit
import pytest
import torch
from adalora_helpers import batch, randomize_adalora
from peftkit import ConfigError, TargetModulesError
from peftkit.testing.models import tiny_llama
from peftkit_adalora import AdaLoraConfig, AdaLoraLayer


def test_the_layer_adds_scaled_p_lambda_q_and_merges_the_same():
    linear = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    base_out = linear(x).detach()
    model = peftkit.get_peft_model(
        torch.nn.Sequential(linear),
        AdaLoraConfig(target_modules=["0"], init_r=4, target_r=2, total_step=5, lora_alpha=3),
    )
    layer = model.base_model.model[0]
    assert isinstance(layer, AdaLoraLayer)
    assert torch.equal(model(x), base_out)  # Λ = 0 at init
    randomize_adalora(model)
    q, singular_values, p = (layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"])
    assert q.shape == (4, 6) and singular_values.shape == (4, 1) and p.shape == (5, 4)
    scale = 3 / (4 + 1e-5)  # lora_alpha / (init_r + PEFT's 1e-5)
    delta = scale * p @ torch.diag(singular_values.view(-1)) @ q
    weight = linear.weight.detach().clone()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base_out + x @ delta.T)
        model.merge_adapter()
        torch.testing.assert_close(linear.weight, weight + delta)
        torch.testing.assert_close(model(x), base_out + x @ delta.T)


def test_default_targets_and_unsupported_layers():
    model = peftkit.get_peft_model(tiny_llama(), AdaLoraConfig(total_step=5))
    assert sorted({path.split(".")[-1] for path, _ in model.adapter_layers()}) == ["q_proj", "v_proj"]
    with pytest.raises(TargetModulesError, match="adalora cannot adapt a embedding layer"):
        peftkit.get_peft_model(tiny_llama(), AdaLoraConfig(total_step=5, target_modules=["embed_tokens"]))


def _orthogonality(model, adapter_name="default"):
    """PEFT's regulariser, written out: the mean of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F over every factor."""
    norms = []
    for name, param in model.named_parameters():
        if name.endswith(f"lora_A.{adapter_name}"):
            norms.append(torch.linalg.norm(param @ param.T - torch.eye(param.shape[0]), "fro"))
        if name.endswith(f"lora_B.{adapter_name}"):
            norms.append(torch.linalg.norm(param.T @ param - torch.eye(param.shape[1]), "fro"))
    return torch.stack(norms).mean()


def test_orthogonality_regulariser_adds_its_weight_times_the_mean_norm_while_training():
    model = peftkit.get_peft_model(
        tiny_llama(), AdaLoraConfig(target_modules=["q_proj", "down_proj"], total_step=5, orth_reg_weight=0.3)
    )
    randomize_adalora(model)
    inputs = batch()
    model.eval()
    plain_loss = model(**inputs, labels=inputs["input_ids"]).loss
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    with torch.no_grad():
        expected = 0.3 * _orthogonality(model)
    assert expected > 0.1
    torch.testing.assert_close(loss - plain_loss, expected)
    loss.backward()  # the regulariser trains the singular vectors
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].grad is not None

    assert model(**inputs).loss is None  # no labels, no loss: nothing to add to
    model.peft_config["default"].orth_reg_weight = 0.0
    torch.testing.assert_close(model(**inputs, labels=inputs["input_ids"]).loss, plain_loss)


def test_an_inference_adapter_adds_no_regulariser():
    model = peftkit.get_peft_model(
        tiny_llama(), AdaLoraConfig(target_modules=["q_proj"], total_step=5, inference_mode=True)
    )
    randomize_adalora(model)
    inputs = batch()
    model.eval()
    plain_loss = model(**inputs, labels=inputs["input_ids"]).loss
    model.train()
    torch.testing.assert_close(model(**inputs, labels=inputs["input_ids"]).loss, plain_loss)


def test_only_one_trainable_adalora_adapter_per_model():
    model = peftkit.get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=["q_proj"], total_step=5))
    with pytest.raises(
        ConfigError, match="AdaLoRA supports only one trainable adapter per model, and 'default' is"
    ):
        model.add_adapter("second", AdaLoraConfig(target_modules=["v_proj"], total_step=5))
    assert "second" not in model.peft_config
    assert not any(layer.holds("second") for _, layer in model.adapter_layers())
    model.add_adapter("second", AdaLoraConfig(target_modules=["v_proj"], total_step=5, inference_mode=True))
    assert model.peft_config["second"].inference_mode
