"""The BOFT layer's math: M is an orthogonal butterfly product (PEFT's permutations), turns the input, s
scales the output; merge is diag(s) W Mᵀ and unmerges bit for bit; mixed batches and dropout as PEFT."""

from __future__ import annotations

import peftkit
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.boft.layer import BOFTLayer as PeftBOFTLayer
from peftkit.testing.models import tiny_llama
from peftkit_boft import BOFTConfig
from peftkit_boft.butterfly import butterfly_matrix, drop_blocks, permute, rotations, unpermute
from peftkit_boft.layer import BOFTLayer
from torch import nn

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)


def peft_permutation(features, blocks, block_size, level, factors):
    """PEFT 0.21's permutation matrix P of butterfly level ``level``."""
    perm = PeftBOFTLayer.block_butterfly_perm(None, features, blocks // 2**level, block_size // 2, factors - 1)
    return PeftBOFTLayer.perm2mat(None, perm)


layouts = st.integers(1, 4).flatmap(
    lambda factors: st.tuples(
        st.just(factors),
        st.integers(0, 2).map(lambda extra: 2 ** (factors - 1) * (extra + 1)),  # blocks
        st.sampled_from([2, 4, 6]) if factors > 1 else st.integers(1, 5),  # block size
    )
)


@settings(max_examples=40, deadline=None)
@given(layout=layouts)
def test_permutations_are_peft_0_21s_butterfly_permutations(layout):
    factors, blocks, size = layout
    features = blocks * size
    x = torch.randn(3, features, dtype=torch.float64)
    for level in range(factors):
        p = peft_permutation(features, blocks, size, level, factors).to(torch.float64)
        torch.testing.assert_close(unpermute(x, level, size), x @ p, rtol=0, atol=0)
        torch.testing.assert_close(permute(x, level, size), x @ p.T, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(layout=layouts, seed=st.integers(0, 2**16), scale=st.sampled_from([0.01, 0.3, 3.0]))
def test_m_is_the_orthogonal_product_of_permuted_block_diagonal_factors(layout, seed, scale):
    factors, blocks, size = layout
    features = blocks * size
    raw = torch.randn(factors, blocks, size, size, generator=torch.Generator().manual_seed(seed)) * scale
    q = rotations(raw.double())
    expected = torch.eye(features, dtype=torch.float64)
    for level in range(factors):
        p = peft_permutation(features, blocks, size, level, factors).double()
        expected = p @ torch.block_diag(*q[level].unbind(0)) @ p.T @ expected
    m = butterfly_matrix(q)
    torch.testing.assert_close(m, expected)
    eye = torch.eye(features, dtype=torch.float64)
    torch.testing.assert_close(m.T @ m, eye)
    torch.testing.assert_close(m @ m.T, eye)


def test_rotation_blocks_are_the_cayley_transform_of_the_skew_part():
    a = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    s = (a - a.transpose(-2, -1)) / 2
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(rotations(a), (eye - s) @ torch.linalg.inv(eye + s))
    symmetric = a + a.transpose(-2, -1)  # no skew part: the identity
    torch.testing.assert_close(rotations(symmetric), eye.expand(2, 3, 5, 5))


def adapted_linear(seed=0, bias=True, in_features=16, **config):
    torch.manual_seed(seed)
    layer = BOFTLayer(nn.Linear(in_features, 6, bias=bias))
    config = {"boft_block_size": 2, "boft_n_butterfly_factor": 3, **config}
    layer.update_layer("a", BOFTConfig(**config), "lin")
    with torch.no_grad():
        layer.boft_R["a"].normal_(0.0, 0.3)
        layer.boft_s["a"].normal_(1.0, 0.3)
    layer.set_active(["a"])
    return layer


def expected_output(layer, x, *names):
    """PEFT's forward, written out: s ⊙ (W (x M_last ⋯ M_first)) + b."""
    base = layer.get_base_layer()
    m = torch.eye(base.in_features)
    s = torch.ones(base.out_features)
    for name in names:
        m = butterfly_matrix(rotations(layer.boft_R[name])) @ m
        s = s * layer.boft_s[name].squeeze(-1)
    out = (x @ m) @ base.weight.T * s
    return out if base.bias is None else out + base.bias


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("factors", [1, 3])
def test_forward_turns_the_input_and_scales_the_output_without_the_bias(bias, factors):
    layer = adapted_linear(bias=bias, boft_n_butterfly_factor=factors)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), expected_output(layer, x, "a"))


def test_two_active_adapters_compose_as_peft():
    layer = adapted_linear()
    layer.update_layer("b", BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2), "lin")
    with torch.no_grad():
        layer.boft_R["b"].normal_(0.0, 0.3)
        layer.boft_s["b"].normal_(1.0, 0.3)
    layer.set_active(["a", "b"])
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), expected_output(layer, x, "a", "b"))
    merged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), merged, rtol=1e-5, atol=1e-5)


def test_merge_is_diag_s_w_m_transposed_and_keeps_the_output():
    layer = adapted_linear()
    x = torch.randn(4, 16)
    expected = layer(x)
    w = layer.base_layer.weight.detach().clone()
    bias = layer.base_layer.bias.detach().clone()
    m = butterfly_matrix(rotations(layer.boft_R["a"].detach()))
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, layer.boft_s["a"].detach() * (w @ m.T))
    assert torch.equal(layer.base_layer.bias, bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factors", [1, 3])
def test_unmerge_gives_back_the_base_weight_bit_for_bit(dtype, factors):
    layer = adapted_linear(boft_n_butterfly_factor=factors)
    layer.base_layer.to(dtype)
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, before)
    layer.unmerge()
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(layer.base_layer.weight.view(bits), before.view(bits))


def test_repeated_merge_unmerge_cycles_do_not_drift():
    layer = adapted_linear()
    before = layer.base_layer.weight.detach().clone()
    for _ in range(5):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)


def test_dropout_makes_a_share_of_one_factor_s_blocks_the_identity():
    torch.manual_seed(0)
    blocks = rotations(torch.randn(3, 8, 4, 4))
    eye = torch.eye(4)
    for _ in range(20):
        dropped = drop_blocks(blocks, 0.5)
        is_eye = (dropped == eye).all(-1).all(-1)
        changed = (dropped != blocks).any(-1).any(-1)
        assert changed.sum(1).tolist().count(4) == 1 and changed.sum().item() == 4  # one factor, 4 of its 8
        assert is_eye[changed].all()
    assert torch.equal(drop_blocks(blocks, 0.1), blocks)  # int(0.1 x 8) = 0 blocks


def test_dropout_acts_only_while_training():
    layer = adapted_linear(boft_dropout=0.5)
    x = torch.randn(4, 16)
    expected = expected_output(layer, x, "a")
    layer.eval()
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    assert not torch.allclose(layer(x), expected)


def two_adapter_model():
    model = peftkit.get_peft_model(tiny_llama(), BOFTConfig(target_modules=["q_proj", "v_proj"]))
    model.add_adapter(
        "other",
        BOFTConfig(
            target_modules=["q_proj", "v_proj"], boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3
        ),
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "boft_" in name:
                param.normal_(1.0 if "boft_s" in name else 0.0, 0.2)
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


def test_bias_boft_only_trains_the_adapted_layers_biases_only():
    model = peftkit.get_peft_model(
        tiny_llama(attention_bias=True, mlp_bias=True), BOFTConfig(target_modules=["q_proj"], bias="boft_only")
    )
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(("q_proj" in name) for name in trainable)
    assert any(name.endswith("q_proj.base_layer.bias") for name in trainable)


def test_a_conv2d_target_is_refused_naming_the_layer_kinds():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(
        peftkit.TargetModulesError, match=r"module '0'.*cannot adapt a conv2d layer; it adapts: linear"
    ):
        peftkit.get_peft_model(model, BOFTConfig(target_modules=["0"]))


def test_dropout_compiles_as_one_graph():
    layer = adapted_linear(boft_dropout=0.5).train()
    step = torch.compile(lambda x: layer(x).square().sum(), backend="aot_eager", fullgraph=True)
    step(torch.randn(3, 16)).backward()
    assert layer.boft_R["a"].grad.abs().sum() > 0
