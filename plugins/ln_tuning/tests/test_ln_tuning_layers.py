"""LN tuning's layer: copies per adapter, merging by writing the copy in, several adapters, mixed batches."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import ConfigError, PeftModel, TargetModulesError, get_peft_model
from peftkit.testing.models import tiny_gpt2, tiny_llama
from peftkit_ln_tuning import LNTuningConfig, LNTuningLayer

IDS = torch.randint(2, 128, (3, 7), generator=torch.Generator().manual_seed(0))


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def randomize(model, adapter_name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            for _, param in layer.adapter_parameters(adapter_name):
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype))


def norm_tensors(model):
    return {
        name: tensor.detach().clone()
        for name, tensor in model.base_model.model.state_dict().items()
        if "ln_tuning_layers" not in name
    }


def gpt2_with_two_adapters():
    model = get_peft_model(tiny_gpt2(), LNTuningConfig(task_type="CAUSAL_LM"))
    model.add_adapter("other", LNTuningConfig(target_modules=["ln_f"]))
    randomize(model, "default", seed=1)
    randomize(model, "other", seed=2)
    return model


def test_each_adapter_gets_its_own_trainable_copy_and_the_base_stays_frozen():
    model = gpt2_with_two_adapters()
    layer = model.base_model.model.transformer.ln_f
    assert isinstance(layer, LNTuningLayer)
    base, first, second = layer.base_layer, layer.ln_tuning_layers["default"], layer.ln_tuning_layers["other"]
    assert type(first) is type(base) is torch.nn.LayerNorm
    assert not any(p.requires_grad for p in base.parameters())
    assert all(p.requires_grad for p in first.parameters())  # the active adapter trains
    assert not any(p.requires_grad for p in second.parameters())
    assert {id(p) for p in first.parameters()}.isdisjoint(id(p) for p in second.parameters())


def test_forward_runs_the_active_adapter_s_copy():
    model = gpt2_with_two_adapters()
    layer = model.base_model.model.transformer.ln_f
    hidden = torch.randn(2, 5, 32)
    for name in ("default", "other"):
        model.set_adapter(name)
        torch.testing.assert_close(layer(hidden), layer.ln_tuning_layers[name](hidden), rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(layer(hidden), layer.base_layer(hidden), rtol=0, atol=0)


def test_two_adapters_cannot_be_active_together():
    model = gpt2_with_two_adapters()
    with pytest.raises(
        ConfigError, match=r"adapters 'default' \(ln_tuning\), 'other' \(ln_tuning\) cannot be"
    ):
        model.set_adapter(["default", "other"])


def test_merge_writes_the_copy_in_and_unmerge_restores_the_base_bit_for_bit():
    model = gpt2_with_two_adapters()
    before = norm_tensors(model)
    unmerged = logits(model)
    model.merge_adapter()
    layer = model.base_model.model.transformer.ln_f
    assert torch.equal(layer.base_layer.weight, layer.ln_tuning_layers["default"].weight)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=0)
    model.unmerge_adapter()
    after = norm_tensors(model)
    assert all(torch.equal(after[name], before[name]) for name in before)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=0)


def test_merging_keeps_the_adapter_s_values_in_its_copy_for_saving(tmp_path):
    model = gpt2_with_two_adapters()
    expected = logits(model)
    model.merge_adapter()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)


def test_merging_another_adapter_takes_the_first_one_out():
    model = gpt2_with_two_adapters()
    model.set_adapter("other")
    only_other = logits(model)
    model.set_adapter("default")
    model.merge_adapter(["default"])
    model.merge_adapter(["other"])
    layer = model.base_model.model.transformer.ln_f
    assert layer.merged_adapters == ["other"]
    assert torch.equal(layer.base_layer.weight, layer.ln_tuning_layers["other"].weight)
    model.unmerge_adapter()
    model.set_adapter("other")
    torch.testing.assert_close(logits(model), only_other, rtol=0, atol=0)


def test_merging_two_adapters_at_once_is_refused():
    model = gpt2_with_two_adapters()
    with pytest.raises(
        ValueError, match=r"LN tuning merges one adapter at a time, but \['default', 'other'\]"
    ):
        model.merge_adapter(["default", "other"])


def test_merge_and_unload_gives_the_plain_model_with_the_adapter_s_norms():
    model = gpt2_with_two_adapters()
    expected = logits(model)
    copy_weight = model.base_model.model.transformer.ln_f.ln_tuning_layers["default"].weight.detach().clone()
    merged = model.merge_and_unload()
    assert not any(isinstance(module, LNTuningLayer) for module in merged.modules())
    assert torch.equal(merged.transformer.ln_f.weight, copy_weight)
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=0)


def test_disable_adapter_while_merged_gives_the_base_model():
    model = gpt2_with_two_adapters()
    with model.disable_adapter():
        base = logits(model)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


@settings(max_examples=8, deadline=None)
@given(rows=st.lists(st.sampled_from(["default", "other", "__base__"]), min_size=3, max_size=3))
def test_a_mixed_batch_gives_each_row_its_own_adapter_s_output(rows):
    model = gpt2_with_two_adapters()
    mixed = logits(model, adapter_names=rows)
    for row, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model)
        else:
            model.set_adapter(name)
            alone = logits(model)
        torch.testing.assert_close(mixed[row], alone[row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_copies_train_in_float32_and_compute_as_the_norm_would(dtype):
    """A float32 copy holding the norm's own values gives the base's outputs bit for bit."""
    model = get_peft_model(tiny_llama().to(dtype), LNTuningConfig())
    layer = model.base_model.model.model.norm
    assert layer.ln_tuning_layers["default"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == dtype
    hidden = torch.randn(2, 5, 32).to(dtype)
    assert layer(hidden).dtype == dtype
    assert torch.equal(logits(model), logits(model.get_base_model()))
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert layer.ln_tuning_layers["default"].weight.grad.dtype == torch.float32


def test_a_module_holding_adapter_layers_is_refused():
    model = get_peft_model(tiny_gpt2(), LNTuningConfig(target_modules=["ln_1"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TargetModulesError, match=r"matched 'transformer\.h\.0', a GPT2Block that holds"):
            model.add_adapter("whole-block", LNTuningConfig(target_modules=r"transformer\.h\.0"))
    assert "whole-block" not in model.peft_config


def test_with_a_lora_adapter_both_act_and_merge_together():
    from peftkit import LoraConfig

    model = get_peft_model(tiny_llama(), LNTuningConfig())
    randomize(model, "default", seed=3)
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ln_alone = logits(model)
    model.set_adapter(["default", "lora"])
    both = logits(model)
    assert not torch.allclose(both, ln_alone)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), both, rtol=1e-5, atol=1e-5)
