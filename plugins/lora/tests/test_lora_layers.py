"""LoRA's math on each base layer kind, several adapters at once, and PEFT's targeting rules."""

from __future__ import annotations

import math

import peftkit
import pytest
import torch
from peftkit import TargetModulesError
from peftkit.adapter_layer import adapter_layers
from peftkit.testing.models import tiny_gpt2, tiny_llama
from peftkit_lora import LoraConfig, LoraLayer
from torch import nn


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1d = nn.Conv1d(3, 6, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(6, 8, kernel_size=(3, 2), stride=1, padding=1)
        self.pointwise = nn.Conv2d(8, 4, kernel_size=1)
        self.embed = nn.Embedding(10, 5)

    def forward(self, x, ids):
        h = self.conv1d(x)  # (b, 6, L)
        h = self.conv2d(h.unsqueeze(-1))
        h = self.pointwise(h)
        return h.flatten(1).sum(-1, keepdim=True) + self.embed(ids).sum((1, 2)).unsqueeze(-1)


def conv_inputs():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 7, generator=generator), torch.randint(0, 10, (2, 4), generator=generator)


@pytest.mark.parametrize("target", ["conv1d", "conv2d", "pointwise", "embed"])
def test_each_layer_kind_merges_to_the_same_outputs(target):
    model = peftkit.get_peft_model(
        ConvNet(), LoraConfig(r=2, target_modules=[target], init_lora_weights=False)
    )
    base = ConvNet()
    with torch.no_grad():
        adapted = model(*conv_inputs())
        assert not torch.allclose(adapted, base(*conv_inputs()))
        model.merge_adapter()
        torch.testing.assert_close(model(*conv_inputs()), adapted, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(*conv_inputs()), adapted, rtol=1e-5, atol=1e-5)


def test_delta_weight_is_scaled_product_of_b_and_a():
    model = peftkit.get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False)
    )
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (6 / 4)
    torch.testing.assert_close(layer.delta_weight("default"), expected)


def test_rslora_scales_by_alpha_over_sqrt_r_and_patterns_override_per_module():
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
    )
    model = peftkit.get_peft_model(tiny_llama(), config)
    attn0, attn1 = (layer.self_attn for layer in model.base_model.model.model.layers)
    assert attn0.q_proj.r["default"] == 4 and attn0.q_proj.scaling["default"] == pytest.approx(
        8 / math.sqrt(4)
    )
    assert attn0.v_proj.r["default"] == 2 and attn0.v_proj.lora_A["default"].weight.shape[0] == 2
    assert attn1.q_proj.scaling["default"] == pytest.approx(3 / math.sqrt(4))


def test_two_active_adapters_add_their_effects():
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    model = peftkit.get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.add_adapter("b", LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        base_out = layer.base_layer(x)
        model.set_adapter("default")
        only_a = layer(x) - base_out
        model.set_adapter("b")
        only_b = layer(x) - base_out
        model.set_adapter(["default", "b"])
        both = layer(x) - base_out
        torch.testing.assert_close(both, only_a + only_b, rtol=1e-5, atol=1e-6)
        model(input_ids=ids)  # the whole model runs with both active


def test_gpt2_conv1d_layers_are_adapted_and_fan_in_fan_out_recorded():
    model = peftkit.get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    assert model.peft_config["default"].fan_in_fan_out is True
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLayer) and layer.lora_A["default"].in_features == 32
    assert layer.lora_B["default"].out_features == 96


def test_all_linear_targets_every_linear_layer_but_the_output_head():
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    names = {path.split(".")[-1] for path, _ in adapter_layers(model.base_model.model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(model.base_model.model.lm_head, LoraLayer)


def test_regex_suffix_exclude_and_layer_selection_follow_peft():
    def targeted(**kwargs):
        model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, **kwargs))
        return sorted(path for path, _ in adapter_layers(model.base_model.model))

    assert targeted(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj") == [
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert targeted(target_modules=["q_proj"], layers_to_transform=[0]) == ["model.layers.0.self_attn.q_proj"]
    assert targeted(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers") == [
        "model.layers.1.self_attn.q_proj"
    ]
    assert targeted(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_default_targets_follow_the_model_type_when_none_are_given():
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2))
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"]


def test_a_matched_module_lora_cannot_adapt_is_a_clear_error():
    with pytest.raises(
        TargetModulesError,
        match=r"module 'model.layers.0.self_attn' matched target_modules, but lora cannot adapt",
    ):
        peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["self_attn"]))


def test_adapter_weights_are_float32_on_a_bfloat16_base_and_outputs_keep_the_base_dtype():
    model = peftkit.get_peft_model(
        tiny_llama().to(torch.bfloat16), LoraConfig(r=2, target_modules=["q_proj"])
    )
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.dtype == torch.bfloat16


def test_bias_all_trains_and_saves_every_bias(tmp_path):
    from safetensors.torch import load_file

    model = peftkit.get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.transformer.h.0.mlp.c_fc.bias" in trainable
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys
    assert "base_model.model.transformer.h.0.mlp.c_fc.bias" in keys


@pytest.mark.parametrize(("autocast", "expected"), [(True, torch.float32), (False, torch.bfloat16)])
def test_autocast_adapter_dtype_chooses_float32_or_the_base_dtype(autocast, expected):
    model = peftkit.get_peft_model(
        tiny_llama().to(torch.bfloat16),
        LoraConfig(r=2, target_modules=["q_proj"]),
        autocast_adapter_dtype=autocast,
    )
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == expected
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16


def test_merging_into_a_tied_embedding_warns_that_the_head_changes_too():
    model = peftkit.get_peft_model(
        tiny_gpt2(), LoraConfig(r=2, target_modules=["wte"], init_lora_weights=False)
    )
    message = r"merging into 'transformer.wte' also changes 'lm_head', whose weight is tied to it"
    with pytest.warns(UserWarning, match=message):
        model.merge_adapter()


def test_merging_an_untied_layer_does_not_warn(recwarn):
    model = peftkit.get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["wpe", "c_attn"]))
    model.merge_adapter()
    assert not [w for w in recwarn if "tied" in str(w.message)]
