"""Bad input fails early with a message that names what is wrong, and loses no data."""

from __future__ import annotations

import json

import peftkit
import pytest
import torch
from peftkit import (
    AdapterLoadError,
    AdapterNameError,
    ConfigError,
    MergeNotSupportedError,
    TargetModulesError,
    UnknownMethodError,
)
from peftkit.testing.models import tiny_llama
from peftkit_lora import LoraConfig


def saved_adapter(folder, hidden_size=32):
    model = peftkit.get_peft_model(
        tiny_llama(hidden_size=hidden_size),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    return model


def test_invalid_config_value_fails_at_construction():
    with pytest.raises(ConfigError, match=r"LoraConfig\.r must be an integer >= 1, got 0"):
        LoraConfig(r=0)


def test_target_modules_matching_nothing_lists_the_closest_names():
    with pytest.raises(TargetModulesError) as info:
        peftkit.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_prj", "gate"]))
    message = str(info.value)
    assert "target_modules=['q_prj', 'gate'] matched no module of LlamaForCausalLM" in message
    assert "'q_prj': did you mean 'q_proj'" in message
    assert "'gate': did you mean 'gate_proj'" in message
    assert "Layer names in this model that can be targeted: " in message and "down_proj" in message


def test_a_failed_injection_leaves_the_model_untouched():
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TargetModulesError):
        model.add_adapter("broken", LoraConfig(target_modules=["nope"]))
    assert list(model.peft_config) == ["default"]


def test_adapter_for_another_base_size_names_the_first_tensor_and_both_shapes(tmp_path):
    saved_adapter(tmp_path, hidden_size=32)
    with pytest.raises(AdapterLoadError) as info:
        peftkit.PeftModel.from_pretrained(tiny_llama(hidden_size=48), tmp_path)
    assert (
        "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape (2, 32) in the adapter "
        "file but (2, 48) in the model"
    ) in str(info.value)


def test_truncated_safetensors_file_is_reported_as_corrupt(tmp_path):
    saved_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(
        AdapterLoadError, match=r"is not a readable safetensors file .*it may be truncated or corrupt"
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_garbage_safetensors_file_is_reported_as_corrupt(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(AdapterLoadError, match=r"is not a readable safetensors file"):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_folder_config_and_weights_each_say_what_is_missing(tmp_path):
    with pytest.raises(AdapterLoadError, match=r"adapter folder '.*nowhere' does not exist"):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")
    with pytest.raises(AdapterLoadError, match=r"has no adapter_config.json: it is not an adapter folder"):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(
        AdapterLoadError, match=r"has no adapter_model.safetensors \(nor a legacy adapter_model.bin\)"
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_invalid_json_config_is_reported(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json' is not valid JSON"):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_unknown_peft_type_names_installed_methods_and_the_package_to_install(tmp_path):
    saved_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "VBLORA"}))
    with pytest.raises(UnknownMethodError) as info:
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    message = str(info.value)
    assert "no installed plugin provides peft_type 'VBLORA' (install 'peftkit-vblora' to use it)" in message
    assert "installed methods: " in message and "lora (LORA)" in message


def test_a_tensor_the_adapter_does_not_own_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    saved_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.mlp.mystery.lora_A.weight"] = torch.zeros(2, 2)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        AdapterLoadError, match=r"holds tensor 'base_model.model.model.layers.0.mlp.mystery.lora_A.weight'"
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_tensor_missing_from_the_file_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    saved_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(
        AdapterLoadError,
        match=r"has no tensor 'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight'",
    ):
        peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_failed_save_leaves_the_earlier_adapter_intact(tmp_path, monkeypatch):
    saved_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = peftkit.get_peft_model(tiny_llama(seed=5), LoraConfig(r=4, target_modules=["v_proj"]))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("peftkit.serialization.write_tensors", crash)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*")), "the staging folder was not cleaned up"


def test_saving_over_an_adapter_keeps_unrelated_files_in_the_folder(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "README.md").write_text("my notes")
    saved_adapter(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")) == []


def test_saving_onto_a_file_path_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("precious")
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(NotADirectoryError, match=r"it is a file, not a folder"):
        model.save_pretrained(target)
    assert target.read_text() == "precious"


def test_adapter_names_are_checked():
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError, match=r"already has an adapter named 'default'"):
        model.add_adapter("default", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError, match=r"no adapter named 'other'; this model has \['default'\]"):
        model.set_adapter("other")
    with pytest.raises(AdapterNameError, match=r"adapter names must be non-empty strings without '.'"):
        model.add_adapter("a.b", LoraConfig(r=2, target_modules=["q_proj"]))


def test_a_non_config_object_is_refused():
    with pytest.raises(ConfigError, match=r"expected a peftkit config \(such as LoraConfig\), got dict"):
        peftkit.get_peft_model(tiny_llama(), {"r": 8})


def test_a_method_that_cannot_merge_says_so():
    from dataclasses import dataclass

    from peftkit import MethodSpec, PeftConfig, hookimpl, method_impl, plugins

    @dataclass
    class NoMergeConfig(PeftConfig):
        method = "nomerge"
        peft_type: str = "NOMERGE"

    class NoMergePlugin:
        @hookimpl
        def peftkit_register_methods(self):
            return [MethodSpec("nomerge", NoMergeConfig, "NOMERGE", family="prompt", mergeable=False)]

        @method_impl("nomerge")
        def peftkit_inject_adapter(self, peft_model, config, adapter_name):
            return True

    with plugins.registered(NoMergePlugin()):
        model = peftkit.get_peft_model(tiny_llama(), NoMergeConfig())
        with pytest.raises(
            MergeNotSupportedError,
            match=r"adapter 'default' is a nomerge adapter, and nomerge cannot be merged",
        ):
            model.merge_and_unload()


def test_a_saved_adapter_folder_gets_the_usual_permissions_not_the_private_temp_ones(tmp_path):
    import os
    import stat

    saved_adapter(tmp_path / "adapter")
    mask = os.umask(0)
    os.umask(mask)
    mode = stat.S_IMODE((tmp_path / "adapter").stat().st_mode)
    assert mode == 0o777 & ~mask
