"""The OFT layer's math: R is orthogonal (exact Cayley), rotates the input, merges as W Rᵀ and unmerges exactly."""

from __future__ import annotations

import logging

import peftkit
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit.testing.models import tiny_llama
from peftkit_oft import OFTConfig
from peftkit_oft.layer import OFTLayer, OFTRotation, cayley, constrained, nearest_divisor, skew_symmetric
from torch import nn

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)


def rotation(blocks, block_size, seed, scale, **config):
    torch.manual_seed(seed)
    module = OFTRotation(blocks, block_size, OFTConfig(oft_block_size=block_size, **config))
    with torch.no_grad():
        module.weight.normal_(0.0, scale)
    return module


@settings(max_examples=60, deadline=None)
@given(
    blocks=st.integers(1, 4),
    block_size=st.integers(2, 16),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.01, 0.1, 1.0, 3.0]),
    block_share=st.booleans(),
)
def test_exact_cayley_r_is_orthogonal_for_any_parameters(blocks, block_size, seed, scale, block_share):
    module = rotation(blocks, block_size, seed, scale, use_cayley_neumann=False, block_share=block_share)
    r = module.matrix()
    eye = torch.eye(blocks * block_size)
    torch.testing.assert_close(r.T @ r, eye, rtol=0, atol=2e-5)
    torch.testing.assert_close(r @ r.T, eye, rtol=0, atol=2e-5)


@settings(max_examples=30, deadline=None)
@given(block_size=st.integers(2, 12), seed=st.integers(0, 2**16), terms=st.integers(2, 8))
def test_neumann_r_is_close_to_orthogonal_for_small_parameters(block_size, seed, terms):
    # the series is an approximation: with two terms RᵀR - I = -4 Q², and more terms only shrink the error
    module = rotation(3, block_size, seed, 1e-3, num_cayley_neumann_terms=terms)
    r = module.matrix()
    q_norm = torch.linalg.matrix_norm(skew_symmetric(module.weight.detach(), block_size)).max().item()
    torch.testing.assert_close(r.T @ r, torch.eye(3 * block_size), rtol=0, atol=4 * q_norm**2 + 1e-5)


def test_parameters_are_the_upper_triangle_of_a_skew_symmetric_block_in_row_major_order():
    q = skew_symmetric(torch.tensor([[1.0, 2.0, 3.0]]), 3)
    assert q.tolist() == [[[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]]


def test_exact_cayley_is_i_minus_q_times_inverse_of_i_plus_q():
    q = skew_symmetric(torch.randn(2, 6, dtype=torch.float64), 4)
    eye = torch.eye(4, dtype=torch.float64)
    expected = (eye - q) @ torch.linalg.inv(eye + q)
    torch.testing.assert_close(cayley(q, None), expected)


def test_neumann_terms_are_peft_0_21s():
    q = skew_symmetric(torch.randn(1, 3, dtype=torch.float64), 3)[0]
    eye = torch.eye(3, dtype=torch.float64)
    expected = {
        1: eye,
        2: eye + 2 * q,
        3: eye + 2 * q + 2 * q @ q + q @ q @ q,
        4: eye + 2 * q + 2 * q @ q + q @ q @ q,
        5: eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q,
    }
    for terms, matrix in expected.items():
        torch.testing.assert_close(cayley(q[None], terms)[0], matrix, msg=f"{terms} terms")


def test_coft_pulls_each_block_onto_the_eps_ball_and_leaves_small_ones():
    upper = torch.tensor([[3.0, 4.0, 0.0], [1e-4, 0.0, 0.0]])  # Frobenius norms 5 * sqrt(2) and small
    radius = 0.5 / 2**0.5
    projected = constrained(upper, 3, eps=0.5)
    assert torch.linalg.matrix_norm(skew_symmetric(projected, 3))[0].item() == pytest.approx(radius)
    assert projected[1].tolist() == upper[1].tolist()


def test_nearest_divisor_is_peft_0_21s_adjustment():
    from peft.tuners.oft.layer import OFTLayer as PeftOFTLayer

    for total in (6, 32, 64, 96, 100):
        for wanted in range(1, 110):
            assert nearest_divisor(total, wanted) == PeftOFTLayer.adjust_oft_parameters(None, total, wanted)


def adapted_linear(seed=0, bias=True, **config):
    torch.manual_seed(seed)
    layer = OFTLayer(nn.Linear(16, 6, bias=bias))
    layer.update_layer("a", OFTConfig(**{"oft_block_size": 4, **config}), "lin")
    with torch.no_grad():
        layer.oft_R["a"].weight.normal_(0.0, 0.3)
    layer.set_active(["a"])
    return layer


@pytest.mark.parametrize("neumann", [True, False])
def test_forward_rotates_the_input_before_the_base_layer(neumann):
    layer = adapted_linear(use_cayley_neumann=neumann)
    x = torch.randn(3, 5, 16)
    r = layer.oft_R["a"].matrix()
    base = layer.get_base_layer()
    torch.testing.assert_close(layer(x), base(x @ r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("neumann", [True, False])
def test_unmerge_gives_back_the_base_weight_bit_for_bit(dtype, neumann):
    layer = adapted_linear(use_cayley_neumann=neumann)
    layer.base_layer.to(dtype)
    before = layer.base_layer.weight.detach().clone()
    bias_before = layer.base_layer.bias.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, before)
    layer.unmerge()
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(layer.base_layer.weight.view(bits), before.view(bits))
    assert torch.equal(layer.base_layer.bias, bias_before)  # OFT leaves the bias alone


def test_merge_multiplies_the_weight_by_r_transposed_and_keeps_the_output():
    layer = adapted_linear()
    x = torch.randn(4, 16)
    expected = layer(x)
    w = layer.base_layer.weight.detach().clone()
    r = layer.oft_R["a"].matrix().detach()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, w @ r.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_repeated_merge_unmerge_cycles_do_not_drift():
    layer = adapted_linear()
    before = layer.base_layer.weight.detach().clone()
    for _ in range(5):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)


def two_adapter_model():
    model = peftkit.get_peft_model(
        tiny_llama(), OFTConfig(target_modules=["q_proj", "v_proj"], oft_block_size=8)
    )
    model.add_adapter("other", OFTConfig(target_modules=["q_proj", "v_proj"], r=2, oft_block_size=0))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "oft_R" in name:
                param.normal_(0.0, 0.2)
    return model.eval()


def test_mixed_batch_runs_each_row_with_its_own_adapter():
    model = two_adapter_model()
    ids = torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["default", "other", "__base__"]).logits
        model.set_adapter("default")
        default = model(input_ids=ids).logits
        model.set_adapter("other")
        other = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], default[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], other[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[2], base[2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(default[0], other[0])


def test_bias_oft_only_trains_the_adapted_layers_biases_only():
    model = peftkit.get_peft_model(
        tiny_llama(attention_bias=True, mlp_bias=True), OFTConfig(target_modules=["q_proj"], bias="oft_only")
    )
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(("q_proj" in name) for name in trainable)
    assert any(name.endswith("q_proj.base_layer.bias") for name in trainable)


def test_trains_on_an_nf4_quantized_llama(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden_size=64).save_pretrained(tmp_path)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        device_map="cpu",
        dtype=torch.float32,
    )
    model = peftkit.get_peft_model(
        peftkit.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False),
        OFTConfig(target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=16),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    model.train()(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert all("oft_R" in name for name, p in model.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_two_active_adapters_rotate_the_input_in_turn_as_peft():
    layer = adapted_linear()
    layer.update_layer("b", OFTConfig(r=2, oft_block_size=0), "lin")
    with torch.no_grad():
        layer.oft_R["b"].weight.normal_(0.0, 0.3)
    layer.set_active(["a", "b"])
    x = torch.randn(2, 16)
    r_a, r_b = layer.oft_R["a"].matrix(), layer.oft_R["b"].matrix()
    torch.testing.assert_close(layer(x), layer.get_base_layer()(x @ r_a @ r_b))


def test_a_conv2d_target_is_refused_naming_the_layer_kinds():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(
        peftkit.TargetModulesError, match=r"module '0'.*cannot adapt a conv2d layer; it adapts: linear"
    ):
        peftkit.get_peft_model(model, OFTConfig(target_modules=["0"], oft_block_size=4))
