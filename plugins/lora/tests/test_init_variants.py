"""PiSSA and OLoRA inits: the base keeps a residual so a fresh adapter changes nothing; PEFT agrees."""

from __future__ import annotations

import copy

import peft
import peftkit
import pytest
import torch
from peftkit import ConfigError
from peftkit.testing.models import randomize_trainable, tiny_gpt2, tiny_llama
from peftkit_lora import LoraConfig
from peftkit_lora.init import pissa_factors

TARGETS = ["q_proj", "down_proj"]


def ids():
    return torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
def test_fresh_adapter_leaves_outputs_unchanged_and_equals_peft_init(init):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    expected = logits(base)
    torch.manual_seed(3)  # pissa_niter draws a random subspace: same seed, same draw as PEFT
    ours = peftkit.get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS)
    )
    torch.manual_seed(3)
    theirs = peft.get_peft_model(
        pristine, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS)
    )
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    ours_state, theirs_state = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert ours_state.keys() == theirs_state.keys()
    for name, param in theirs_state.items():
        torch.testing.assert_close(ours_state[name], param, rtol=1e-5, atol=1e-6, msg=name)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert not torch.allclose(layer.base_layer.weight, original, atol=1e-4), "the base kept no residual"


def test_pissa_adapter_loads_in_peft_on_the_original_base_with_the_same_outputs(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, LoraConfig(r=4, init_lora_weights="pissa", target_modules=TARGETS))
    with torch.no_grad():  # stands in for training: move the adapter away from its init
        for _, param in ours.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    expected = logits(ours)
    ours.save_pretrained(tmp_path)
    # both libraries recompute the residual from the original base when the config says "pissa"
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)
    again = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(again), expected, rtol=1e-5, atol=1e-5)


def test_pissa_takes_the_top_singular_directions_and_the_fast_svd_comes_close():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    spectrum = 2.0 ** -torch.arange(32, dtype=torch.float32)
    weight = u[:, :32] * spectrum @ v.T
    top = u[:, :4] * spectrum[:4] @ v[:, :4].T
    a, b = pissa_factors(weight, 4, 0.5, "pissa")
    torch.testing.assert_close(0.5 * b @ a, top, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    a, b = pissa_factors(weight, 4, 0.5, "pissa_niter_4")
    assert ((0.5 * b @ a) - top).norm() / top.norm() < 1e-3


def test_pissa_on_a_transposed_conv1d_layer_keeps_outputs():
    base = tiny_gpt2()
    expected = logits(base)
    model = peftkit.get_peft_model(base, LoraConfig(r=2, init_lora_weights="olora", target_modules=["c_fc"]))
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_dora_on_a_pissa_init_starts_from_the_original_weight_norms():
    base = tiny_llama()
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = peftkit.get_peft_model(
        base, LoraConfig(r=4, init_lora_weights="pissa", use_dora=True, target_modules=["q_proj"])
    )
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), original.norm(dim=1))
    randomize_trainable(model)  # still exact to merge
    expected = logits(model)
    torch.testing.assert_close(logits(model.merge_and_unload()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", ["pissa_niter_0", "pissa_niter_x", "PISSA", "lora_ga", 1, None])
def test_unknown_inits_fail_at_construction_naming_the_choices(value):
    with pytest.raises(ConfigError, match=r"LoraConfig.init_lora_weights must be .*'pissa_niter_<N>'"):
        LoraConfig(init_lora_weights=value)


def test_base_weight_inits_need_a_linear_layer():
    with pytest.raises(ValueError, match="init_lora_weights='pissa' needs a linear layer, not a embedding"):
        peftkit.get_peft_model(
            tiny_llama(), LoraConfig(init_lora_weights="pissa", target_modules=["embed_tokens"])
        )
