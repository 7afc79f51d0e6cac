"""Hot-swapping an adapter: another saved adapter's weights copied into the loaded one in place."""

from __future__ import annotations

import math

import peft
import peftkit
import pytest
import torch
from peftkit import AdapterLoadError, AdapterNameError, PeftModel, hotswap_adapter
from peftkit.testing.models import tiny_llama
from peftkit_ia3 import IA3Config
from peftkit_lora import LoraConfig
from safetensors.torch import load_file, save_file

IDS = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj"]


def save_lora(folder, seed, **fields):
    """A LoRA adapter with random (non-identity) weights drawn from ``seed``, saved to ``folder``."""
    config = LoraConfig(**({"r": 4, "target_modules": TARGETS, "init_lora_weights": False} | fields))
    base = tiny_llama()  # seeds torch itself
    torch.manual_seed(seed)
    peftkit.get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture
def first(tmp_path):
    return save_lora(tmp_path / "first", seed=1, lora_alpha=8)


@pytest.fixture
def second(tmp_path):
    # differs in every field a LoRA hot-swap may change
    return save_lora(tmp_path / "second", seed=2, lora_alpha=32, alpha_pattern={"v_proj": 2}, use_rslora=True)


def saved_q_proj_a(folder):
    return load_file(folder / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ]


def q_proj_a(model):
    return dict(model.adapter_layers())["model.layers.0.self_attn.q_proj"].lora_A["default"].weight


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def identities(model):
    return (
        {name: id(module) for name, module in model.named_modules()},
        {name: id(param) for name, param in model.named_parameters()},
    )


def swap_with_function(model, folder):
    hotswap_adapter(model, folder, adapter_name="default", torch_device="cpu")


def swap_with_load_adapter(model, folder):
    model.load_adapter(folder, "default", hotswap=True)


@pytest.mark.parametrize("swap", [swap_with_function, swap_with_load_adapter])
def test_swap_gives_the_outputs_of_a_fresh_load_and_keeps_every_module_and_parameter(first, second, swap):
    model = PeftModel.from_pretrained(tiny_llama(), first)
    before = logits(model)
    modules, params = identities(model)
    swap(model, second)
    expected = logits(PeftModel.from_pretrained(tiny_llama(), second))
    assert not torch.equal(expected, before)
    assert torch.equal(logits(model), expected)
    assert identities(model) == (modules, params)
    assert not torch.equal(saved_q_proj_a(first), saved_q_proj_a(second))
    assert torch.equal(q_proj_a(model), saved_q_proj_a(second))
    layers = dict(model.adapter_layers())
    # rsLoRA: alpha / sqrt(r); alpha_pattern sets v_proj's alpha
    assert layers["model.layers.0.self_attn.q_proj"].scaling["default"] == 32 / math.sqrt(4)
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == 2 / math.sqrt(4)
    assert model.peft_config["default"].lora_alpha == 32
    assert model.active_adapters == ["default"]


def test_swap_into_a_trained_model_keeps_optimizer_references(first, second):
    config = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)  # init is compared too
    model = peftkit.get_peft_model(tiny_llama(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trained = [p for p in model.parameters() if p.requires_grad]
    hotswap_adapter(model, second)
    expected = logits(PeftModel.from_pretrained(tiny_llama(), second))
    assert torch.equal(logits(model), expected)
    assert [p for p in model.parameters() if p.requires_grad] == trained  # still trainable, same objects
    assert all(any(p is q for q in optimizer.param_groups[0]["params"]) for p in trained)


def test_load_adapter_hotswap_sets_trainability_as_a_load_does(first, second):
    model = PeftModel.from_pretrained(tiny_llama(), first)
    assert model.get_nb_trainable_parameters()[0] == 0
    model.load_adapter(second, "default", is_trainable=True, hotswap=True)
    assert model.get_nb_trainable_parameters()[0] == 4 * 2 * (32 + 32) + 4 * 2 * (32 + 16)
    assert model.peft_config["default"].inference_mode is False


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 8}, r"LoraConfig\.r is 4 in the loaded adapter but 8 in the new one"),
        ({"target_modules": ["q_proj", "k_proj"]}, r"LoraConfig\.target_modules is \['q_proj', 'v_proj'\]"),
        ({"rank_pattern": {"q_proj": 2}}, r"LoraConfig\.rank_pattern is \{\} in the loaded adapter but"),
        ({"use_dora": True}, r"LoraConfig\.use_dora is False in the loaded adapter but True"),
    ],
)
def test_a_structural_difference_names_the_field_and_changes_nothing(tmp_path, first, fields, message):
    other = save_lora(tmp_path / "other", seed=3, **fields)
    model = PeftModel.from_pretrained(tiny_llama(), first)
    before = logits(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=message) as error:
        hotswap_adapter(model, other)
    assert "fields that may differ: alpha_pattern, lora_alpha, use_rslora" in str(error.value)
    assert torch.equal(logits(model), before)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert model.peft_config["default"].lora_alpha == 8


def test_target_modules_naming_the_same_layers_otherwise_swap(tmp_path, first):
    reordered = save_lora(tmp_path / "reordered", seed=3, target_modules=["v_proj", "q_proj"])
    model = PeftModel.from_pretrained(tiny_llama(), first)
    hotswap_adapter(model, reordered)
    assert torch.equal(logits(model), logits(PeftModel.from_pretrained(tiny_llama(), reordered)))
    # PEFT saves "all-linear" as the names it selected
    all_linear = save_lora(tmp_path / "all", seed=4, target_modules="all-linear")
    listed = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    named = save_lora(tmp_path / "named", seed=5, target_modules=listed)
    model = PeftModel.from_pretrained(tiny_llama(), all_linear)
    hotswap_adapter(model, named)
    assert torch.equal(logits(model), logits(PeftModel.from_pretrained(tiny_llama(), named)))


def test_a_file_that_fails_after_copying_began_is_rolled_back(tmp_path, first, second):
    # same config, but the file holds a tensor no module takes: found only after the layer tensors were copied
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((second / "adapter_config.json").read_text())
    tensors = load_file(second / "adapter_model.safetensors")
    save_file(
        tensors | {"base_model.model.nowhere.lora_A.weight": torch.ones(4, 32)},
        broken / "adapter_model.safetensors",
    )
    model = PeftModel.from_pretrained(tiny_llama(), first)
    before = logits(model)
    with pytest.raises(AdapterLoadError, match="nowhere"):
        hotswap_adapter(model, broken)
    assert torch.equal(logits(model), before)
    assert torch.equal(q_proj_a(model), saved_q_proj_a(first))
    assert dict(model.adapter_layers())["model.layers.0.self_attn.q_proj"].scaling["default"] == 8 / 4


def test_another_method_is_refused(tmp_path, first):
    ia3 = tmp_path / "ia3"
    peftkit.get_peft_model(
        tiny_llama(), IA3Config(target_modules=TARGETS, feedforward_modules=[])
    ).save_pretrained(ia3)
    model = PeftModel.from_pretrained(tiny_llama(), first)
    with pytest.raises(
        AdapterLoadError, match=r"it is a ia3 adapter \(IA3Config\) but 'default' is a lora adapter"
    ):
        hotswap_adapter(model, ia3)


def test_a_missing_adapter_name_is_an_error_naming_the_adapters(first, second):
    model = PeftModel.from_pretrained(tiny_llama(), first)
    with pytest.raises(AdapterNameError, match=r"no adapter of that name \(it has \['default'\]\)"):
        hotswap_adapter(model, second, adapter_name="other")
    with pytest.raises(AdapterNameError, match="'other'"):
        model.load_adapter(second, "other", hotswap=True)
    assert list(model.peft_config) == ["default"]


def test_a_merged_adapter_is_refused_until_unmerged(first, second):
    """As PEFT: swapping merged weights would make a later unmerge subtract the wrong delta."""
    model = PeftModel.from_pretrained(tiny_llama(), first)
    before = logits(model)
    model.merge_adapter()
    with pytest.raises(AdapterLoadError, match=r"merged into the base weights.*unmerge_adapter\(\)"):
        hotswap_adapter(model, second)
    model.unmerge_adapter()
    assert torch.equal(logits(model), before)
    hotswap_adapter(model, second)
    assert torch.equal(logits(model), logits(PeftModel.from_pretrained(tiny_llama(), second)))


def test_a_peft_saved_adapter_hot_swaps_into_a_peftkit_model(tmp_path, first):
    base = tiny_llama()
    torch.manual_seed(4)
    theirs = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=TARGETS, lora_alpha=16, init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path / "peft")
    model = PeftModel.from_pretrained(tiny_llama(), first)
    hotswap_adapter(model, tmp_path / "peft")
    assert torch.equal(logits(model), logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")))
    torch.testing.assert_close(logits(model), logits(theirs))
