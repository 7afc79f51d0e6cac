"""The PeftModel API behaves as PEFT's does."""

from __future__ import annotations

import copy

import peft
import peftkit
import pytest
import torch
from peftkit.adapter_layer import AdapterLayer
from peftkit.testing.models import randomize_trainable, tiny_bert, tiny_llama
from peftkit_lora import LoraConfig

IDS = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def lora(**kwargs):
    return LoraConfig(**({"r": 2, "target_modules": ["q_proj", "v_proj"]} | kwargs))


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [
        (tiny_llama, dict(target_modules="all-linear", task_type="CAUSAL_LM")),
        (tiny_bert, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
        (lambda: tiny_bert(task="token_cls"), dict(target_modules=["query"], task_type="TOKEN_CLS")),
    ],
)
def test_trainable_and_total_parameter_counts_equal_peft(build, kwargs):
    ours = peftkit.get_peft_model(build(), LoraConfig(r=4, **kwargs))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, **kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_print_trainable_parameters_uses_peft_wording(capsys):
    peftkit.get_peft_model(tiny_llama(), lora()).print_trainable_parameters()
    out = capsys.readouterr().out
    assert out.startswith("trainable params: 448 || all params: ") and "|| trainable%: " in out


def test_classification_head_trains_and_is_saved_with_the_adapter(tmp_path):
    base = tiny_bert()
    pristine = copy.deepcopy(base)
    model = peftkit.get_peft_model(base, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert model.base_model.model.classifier.modules_to_save["default"].weight.requires_grad
    randomize_trainable(model, seed=7)
    expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected)


def test_disable_adapter_gives_the_base_model_exactly():
    base = tiny_llama()
    expected = base(input_ids=IDS).logits
    model = randomize_trainable(peftkit.get_peft_model(base, lora()), seed=7)
    assert not torch.equal(model(input_ids=IDS).logits, expected)
    with model.disable_adapter():
        assert torch.equal(model(input_ids=IDS).logits, expected)
    assert not torch.equal(model(input_ids=IDS).logits, expected)


def test_added_adapters_are_inactive_until_set_and_deleting_the_active_one_falls_back():
    model = randomize_trainable(peftkit.get_peft_model(tiny_llama(), lora()), seed=7)
    first = model(input_ids=IDS).logits
    model.add_adapter("b", lora(r=3, init_lora_weights=False))
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(model(input_ids=IDS).logits, first)
    model.set_adapter("b")
    assert not torch.allclose(model(input_ids=IDS).logits, first)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    model.delete_adapter("b")
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(input_ids=IDS).logits, first)


def test_merge_and_unload_leaves_a_plain_model_with_the_same_outputs():
    model = randomize_trainable(peftkit.get_peft_model(tiny_llama(), lora(task_type="CAUSAL_LM")), seed=7)
    expected = model(input_ids=IDS).logits
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_unload_drops_the_adapter_and_restores_base_outputs():
    base = tiny_llama()
    expected = base(input_ids=IDS).logits
    model = randomize_trainable(peftkit.get_peft_model(base, lora()), seed=7)
    model.merge_adapter()
    plain = model.unload()
    torch.testing.assert_close(plain(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_greedy_generation_equals_peft_for_the_same_adapter(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    model = randomize_trainable(peftkit.get_peft_model(base, lora(task_type="CAUSAL_LM")), seed=7)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    mask = torch.ones_like(IDS)
    settings = dict(input_ids=IDS, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**settings), theirs.generate(**settings))


def test_from_pretrained_is_frozen_unless_trainable_and_load_adapter_does_not_activate(tmp_path):
    randomize_trainable(peftkit.get_peft_model(tiny_llama(), lora()), seed=7).save_pretrained(tmp_path)
    frozen = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 448
    trainable.load_adapter(tmp_path, adapter_name="again")
    assert trainable.active_adapters == ["default"] and "again" in trainable.peft_config


def test_positional_inputs_and_base_attributes_pass_through():
    model = peftkit.get_peft_model(tiny_llama(), lora())
    torch.testing.assert_close(model(IDS).logits, model(input_ids=IDS).logits)
    assert model.config.model_type == "llama"
    assert model.get_base_model() is model.base_model.model


def test_legacy_bin_adapters_are_read_with_weights_only(tmp_path):
    model = randomize_trainable(peftkit.get_peft_model(tiny_llama(), lora()), seed=7)
    expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected)


def test_training_changes_only_the_adapter():
    model = peftkit.get_peft_model(tiny_llama(), lora(init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)


class _Counter:
    """A plugin adding a PeftModel method and reacting to optimizer steps and outputs, for the hooks below."""

    def __init__(self, method_name: str = "count_adapter_layers") -> None:
        self.method_name = method_name
        self.steps: list[tuple[str, int]] = []

    @peftkit.hookimpl
    def peftkit_model_methods(self):
        return {self.method_name: lambda model, scale=1: scale * len(model.adapter_layers())}

    @peftkit.hookimpl
    def peftkit_on_optimizer_step(self, peft_model, config, adapter_name, global_step):
        self.steps.append((adapter_name, global_step))

    @peftkit.hookimpl
    def peftkit_transform_outputs(self, peft_model, config, adapter_name, inputs, outputs):
        outputs.logits = outputs.logits + 1.0
        return outputs


def test_plugins_add_model_methods_and_hear_optimizer_steps_and_outputs():
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    with peftkit.plugins.registered(_Counter()) as counter:
        assert model.count_adapter_layers(scale=3) == 3 * 2
        model.update_and_allocate(0)
        model.base_model.update_and_allocate(1)  # PEFT's spelling
        assert counter.steps == [("default", 0), ("default", 1)]
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, plain + 1.0)
            with model.disable_adapter():
                torch.testing.assert_close(model(input_ids=ids).logits, plain)
    with pytest.raises(AttributeError):
        model.count_adapter_layers()  # gone with its plugin


def test_two_plugins_adding_one_model_method_is_an_error_naming_both():
    with (
        peftkit.plugins.registered(_Counter("same"), name="first"),
        peftkit.plugins.registered(_Counter("same"), name="second"),
    ):
        model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
        with pytest.raises(
            peftkit.PluginConflictError,
            match="plugins 'first' and 'second' both add the PeftModel method 'same'",
        ):
            model.same()
