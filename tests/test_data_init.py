"""The core's data-driven initialisation (``peftkit.initialize_from_data`` and its hook), and the names a
method exports through ``MethodSpec.exports``."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import ClassVar

import peftkit
import pytest
from peftkit import AdapterNameError, MethodSpec, PeftConfig, get_peft_model, hookimpl, method_impl, plugins
from peftkit.data_init import forward_batch, initialize_from_data
from peftkit.testing.models import tiny_llama
from peftkit_lora import LoraConfig


@pytest.fixture
def lora_model():
    return get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))


def test_the_owning_method_gets_the_batches_forward_and_options(lora_model):
    calls = []

    @method_impl("lora")
    def peftkit_initialize_from_data(
        peft_model, config, adapter_name, batches, forward, show_progress, options
    ):
        calls.append((peft_model, config, adapter_name, batches, forward, show_progress, options))
        return True

    batches = [{"input_ids": None}]
    recorder = types.SimpleNamespace(peftkit_initialize_from_data=peftkit_initialize_from_data)
    with plugins.registered(recorder):  # registered last, so asked first
        returned = initialize_from_data(lora_model, batches, show_progress_bar=False, rows=3)
    assert returned is lora_model
    assert calls == [
        (lora_model, lora_model.peft_config["default"], "default", batches, forward_batch, False, {"rows": 3})
    ]


def test_lora_s_answer_refuses_an_adapter_not_made_for_it(lora_model):
    with pytest.raises(
        ValueError, match=r"EVA initialises only LoRA adapters made with init_lora_weights='eva'"
    ):
        initialize_from_data(lora_model, [{}])


def test_a_method_without_a_data_driven_init_is_named():
    from peftkit import IA3Config

    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"adapter 'default' \(ia3\) has no data-driven initialisation"):
        initialize_from_data(model, [{}])


def test_refusals_name_what_is_wrong(lora_model):
    with pytest.raises(TypeError, match=r"needs a peftkit PeftModel .*got LlamaForCausalLM"):
        initialize_from_data(tiny_llama(), [{}])
    with pytest.raises(AdapterNameError, match=r"no adapter named 'other'; this model has \['default'\]"):
        initialize_from_data(lora_model, [{}], adapter_name="other")
    with pytest.raises(TypeError, match=r"needs an iterable of batches \(a dataloader\), got dict"):
        initialize_from_data(lora_model, {"input_ids": None})
    with pytest.raises(ValueError, match=r"the dataloader is empty"):
        initialize_from_data(lora_model, [])


def test_forward_batch_passes_dicts_as_keywords_and_sequences_as_positions():
    seen = []

    def model(*args, **kwargs):
        seen.append((args, kwargs))

    forward_batch(model, {"x": 1})
    forward_batch(model, (1, 2))
    forward_batch(model, 3)
    assert seen == [((), {"x": 1}), ((1, 2), {}), ((3,), {})]


# --- exports -------------------------------------------------------------------------------------------
def test_lora_s_exports_are_importable_from_peftkit_as_from_peft():
    import peftkit_lora
    from peftkit import EvaConfig, LoftQConfig, get_eva_state_dict, initialize_lora_eva_weights

    assert EvaConfig is peftkit_lora.EvaConfig and LoftQConfig is peftkit_lora.LoftQConfig
    assert initialize_lora_eva_weights is peftkit_lora.initialize_lora_eva_weights
    assert get_eva_state_dict is peftkit_lora.get_eva_state_dict


def test_a_method_s_exports_resolve_on_first_use_and_other_names_do_not():
    @dataclass
    class ExporterConfig(PeftConfig):
        method: ClassVar[str] = "exporter"

    @hookimpl
    def peftkit_register_methods():
        spec = MethodSpec("exporter", ExporterConfig, "EXPORTER", "weight-delta", exports=("json:dumps",))
        return [spec]

    plugin = types.SimpleNamespace(peftkit_register_methods=peftkit_register_methods)
    with plugins.registered(plugin):
        import json

        assert peftkit.dumps is json.dumps
    with pytest.raises(AttributeError, match=r"module 'peftkit' has no attribute 'dumps'"):
        peftkit.dumps  # noqa: B018
