"""DoRA (use_dora=True): PEFT's format and outputs both ways, the norm's math, gradients and merging."""

from __future__ import annotations

import copy

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import randomize_trainable, tiny_gpt2, tiny_llama, tiny_plain
from peftkit_lora import LoraConfig, dora

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "llama-all-linear": (tiny_llama, dict(target_modules="all-linear")),
    "llama-embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc", "wpe"])),
    "plain-conv1d-linear": (tiny_plain, dict(target_modules=["conv", "fc1", "head"])),
    "llama-rslora-patterns": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj"], use_rslora=True, rank_pattern={"v_proj": 2}),
    ),
}


def ids():
    return torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def output(model):
    with torch.no_grad():
        out = model(input_ids=ids())
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_dora_adapter_saved_here_gives_the_same_outputs_in_peft(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(
        peftkit.get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, **kwargs))
    )
    expected = output(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(output(theirs), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_dora_adapter_loads_here_with_the_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    theirs = randomize_trainable(
        peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **kwargs))
    )
    expected = output(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(output(ours), expected, **TOL)


def test_magnitude_is_saved_under_peft_key_and_starts_at_the_row_norms_of_w():
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), weight.norm(dim=1))
    keys = peftkit.serialization.adapter_state_dict(model, "default")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys


@pytest.mark.parametrize("shape", [(7, 5, 3), (16, 32, 4), (1, 9, 1)])
def test_row_norms_equal_the_norms_of_the_dense_sum(shape):
    out, k, r = shape
    g = torch.Generator().manual_seed(out * k)
    w, a, b = (
        torch.randn(out, k, generator=g),
        torch.randn(r, k, generator=g),
        torch.randn(out, r, generator=g),
    )
    expected = (w + 0.7 * b @ a).norm(dim=1)
    torch.testing.assert_close(dora.row_norms(w, a, b, 0.7), expected, rtol=1e-5, atol=1e-5)


def _peft_twin(ours, pristine, config):
    """A PEFT model of the same config holding our adapter's values (PEFT names the magnitude ``.weight``)."""
    theirs = peft.get_peft_model(pristine, peft.LoraConfig(**config))
    ours_named = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(
                    ours_named[
                        name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")
                    ]
                )
    return theirs, ours_named


def test_training_gradients_equal_peft_so_the_norm_is_detached():
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    config = dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])
    ours = randomize_trainable(peftkit.get_peft_model(base, LoraConfig(**config)))
    theirs, ours_named = _peft_twin(ours, pristine, config)
    for model in (ours, theirs):
        model.train()
        model(input_ids=ids()).logits.square().mean().backward()
    compared = 0
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            ours_param = ours_named[
                name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")
            ]
            torch.testing.assert_close(ours_param.grad, param.grad, rtol=1e-4, atol=1e-7)
            compared += 1
    assert compared == 3 * 2 * 2  # A, B and m in two layers of each of two targets


def test_dropout_in_training_matches_peft_under_the_same_seed():
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    config = dict(r=4, lora_alpha=8, use_dora=True, lora_dropout=0.3, target_modules=["q_proj", "up_proj"])
    ours = randomize_trainable(peftkit.get_peft_model(base, LoraConfig(**config)))
    theirs, _ = _peft_twin(ours, pristine, config)
    results = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(11)
        with torch.no_grad():
            results.append(model(input_ids=ids()).logits)
    torch.testing.assert_close(results[0], results[1], **TOL)
    ours.eval()
    assert not torch.allclose(output(ours), results[0]), "dropout changed nothing in training mode"


def test_eval_forward_reuses_the_base_output_and_training_with_dropout_applies_w_again(monkeypatch):
    model = peftkit.get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, lora_dropout=0.5)
    )
    layers = [m for _, m in model.adapter_layers()]
    calls = []
    for layer in layers:
        original = layer._apply_weight
        monkeypatch.setattr(
            layer, "_apply_weight", lambda x, w, original=original: calls.append(1) or original(x, w)
        )
    model.eval()
    output(model)
    assert calls == []
    model.train()
    model(input_ids=ids())
    assert len(calls) == len(layers)


def test_merge_then_unmerge_restores_the_base_weights_and_merged_outputs_match():
    base = tiny_llama()
    before = {n: p.clone() for n, p in base.named_parameters()}
    model = randomize_trainable(
        peftkit.get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    )
    expected = output(model)
    model.merge_adapter()
    torch.testing.assert_close(output(model), expected, **TOL)
    model.unmerge_adapter()
    for name, param in model.base_model.model.named_parameters():
        plain = name.replace(".base_layer", "")
        if plain in before:
            torch.testing.assert_close(param, before[plain], rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("target", ["embed", "conv", "head"])
def test_a_bfloat16_forward_keeps_its_precision_when_the_magnitude_is_far_below_the_norm(target):
    # DoRA's term nearly cancels the base output then: rounding the term to bfloat16 before adding it
    # kept only rounding error (the embedding's output was 80% off)
    model = peftkit.get_peft_model(
        tiny_plain(), LoraConfig(r=4, target_modules=[target], use_dora=True, init_lora_weights=False)
    )
    layer = dict(model.adapter_layers())[target]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(0.01)
    model = model.to(torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the same values, computed in float32
    inputs = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(inputs).double()
        error = ((model(inputs).double() - expected).norm() / expected.norm()).item()
    assert error < 2**-7, f"relative error {error:.3g} (bfloat16 keeps 8 bits)"
