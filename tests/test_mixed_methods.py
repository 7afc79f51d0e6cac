"""Adapters of different methods on one model: activated together, merged in order, saved and loaded back."""

from __future__ import annotations

import copy
import json

import peft
import peftkit
import pytest
import torch
from peftkit import MergeNotSupportedError, PeftModel
from peftkit.testing.models import randomize_trainable, tiny_llama
from peftkit_bottleneck import BottleneckConfig
from peftkit_ia3 import IA3Config
from peftkit_lora import LoraConfig
from peftkit_prompt_tuning import PromptTuningConfig

IDS = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(3))
TOL = dict(rtol=1e-5, atol=1e-6)


def logits(model, names=None):
    """The logits at the input's positions (a causal-LM prompt adds its virtual tokens' in front)."""
    if names is not None:
        model.set_adapter(names)
    with torch.no_grad():
        return model(input_ids=IDS).logits[:, -IDS.shape[1] :]


def trained(model, name, seed):
    """Give adapter ``name`` values as training would (IA3's vectors stay near 1)."""
    model.set_adapter(name)
    randomize_trainable(model, seed=seed, scale=0.05)
    if isinstance(model.peft_config[name], IA3Config):
        with torch.no_grad():
            for _, layer in model.adapter_layers():
                if layer.holds(name):
                    layer.ia3_l[name].add_(1.0)
    return model


def four_methods():
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter(
        "ia3", IA3Config(target_modules=["up_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    model.add_adapter("adapter", BottleneckConfig(style="pfeiffer", reduction_factor=4))
    model.add_adapter("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    for seed, name in enumerate(["default", "ia3", "adapter", "prompt"]):
        trained(model, name, seed)
    return model


ALL = ["default", "ia3", "adapter", "prompt"]


def test_lora_ia3_a_bottleneck_and_a_prompt_act_together_and_come_back_from_disk(tmp_path):
    model = four_methods()
    together = logits(model, ALL)
    for left_out in ALL:
        assert not torch.allclose(logits(model, [n for n in ALL if n != left_out]), together), left_out
    model.save_pretrained(tmp_path)

    for name, peft_type in [("ia3", "IA3"), ("adapter", "BOTTLENECK"), ("prompt", "PROMPT_TUNING")]:
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["peft_type"] == peft_type
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, all_adapters=True)
    assert loaded.active_adapters == ["default"]
    assert sorted(loaded.peft_config) == sorted(ALL)
    torch.testing.assert_close(logits(loaded, ALL), together, **TOL)
    torch.testing.assert_close(logits(loaded, ["ia3", "prompt"]), logits(model, ["ia3", "prompt"]), **TOL)


def test_merging_merges_every_active_mergeable_adapter_and_refuses_the_rest():
    model = four_methods()
    model.set_adapter(["default", "ia3", "adapter"])
    with pytest.raises(MergeNotSupportedError, match="adapter 'adapter' is a bottleneck adapter"):
        model.merge_adapter()
    model.set_adapter(["default", "ia3"])
    expected = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, **TOL)


@pytest.mark.parametrize("ia3_first", [True, False], ids=["ia3-inside", "lora-inside"])
def test_lora_and_ia3_on_the_same_layers_merge_to_the_same_outputs(ia3_first):
    lora = LoraConfig(r=4, target_modules=["v_proj", "down_proj", "q_proj"])
    ia3 = IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    base = tiny_llama()
    before = {name: param.clone() for name, param in base.named_parameters()}
    first, second = (("ia3", ia3), ("lora", lora)) if ia3_first else (("lora", lora), ("ia3", ia3))
    model = peftkit.get_peft_model(base, first[1], adapter_name=first[0])
    model.add_adapter(*second)
    trained(model, "ia3", 1)
    trained(model, "lora", 2)
    expected = logits(model, ["lora", "ia3"])

    model.merge_adapter()  # every active adapter, innermost first
    torch.testing.assert_close(logits(model), expected, **TOL)
    model.unmerge_adapter()
    for name, param in model.base_model.model.named_parameters():
        plain = name.replace(".base_layer", "")
        if plain in before:
            torch.testing.assert_close(param, before[plain], rtol=1e-6, atol=1e-6, msg=name)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, **TOL)


def test_an_outer_adapter_cannot_merge_over_an_active_unmerged_inner_one():
    model = peftkit.get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="lora"
    )
    model.add_adapter("ia3", IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    model.set_adapter(["lora", "ia3"])
    with pytest.raises(
        MergeNotSupportedError,
        match="cannot merge adapter 'ia3' while adapter 'lora', which wraps the same layer beneath it, stays active",
    ):
        model.merge_adapter(["ia3"])
    model.set_adapter("ia3")  # with the inner adapter inactive, merging the outer one is exact
    expected = logits(model)
    model.merge_adapter(["ia3"])
    torch.testing.assert_close(logits(model), expected, **TOL)


def test_lora_inside_a_wrapped_block_is_found_and_saved_under_peft_keys(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    model = peftkit.get_peft_model(base, BottleneckConfig(style="houlsby"), adapter_name="adapter")
    model.add_adapter("default", LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    trained(model, "default", 5)
    paths = [path for path, layer in model.adapter_layers() if layer.holds("default")]
    assert "model.layers.0.self_attn.base_layer.q_proj" in paths
    expected = logits(model, "default")
    model.save_pretrained(tmp_path, selected_adapters=["default"])

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, expected, **TOL)
    keys = peftkit.serialization.read_tensors(tmp_path)
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight" in keys
    assert not any("base_layer" in key for key in keys)


def test_a_prompt_joins_layer_adapters_but_not_another_prompt():
    model = four_methods()
    model.add_adapter("prompt2", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.set_adapter(["prompt", "default"])
    with pytest.raises(
        peftkit.ConfigError, match=r"'prompt' \(prompt_tuning\), 'prompt2' \(prompt_tuning\) cannot"
    ):
        model.set_adapter(["prompt", "default", "prompt2"])
    assert model.active_adapters == ["prompt", "default"]
