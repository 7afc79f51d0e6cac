"""The layer hooks on bitsandbytes layers: features, dequantized reads, requantized writes, dense copies.

4-bit layers are read, written and copied in both of bitsandbytes' CPU layouts, the standard one and the
packed one (see conftest.py); the packed kernel's outputs are checked where the CPU has it.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F
from peftkit import plugins
from peftkit.layer_access import LINEAR
from peftkit_bnb import plugin
from torch import nn

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

FOUR_BIT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
# ‖W − dequantize(quantize(W))‖ / ‖W‖ for Gaussian-like weights: 4-bit codes leave about 9 % (nf4) to
# 12 % (fp4); int8 rows about 0.4 %. The bounds leave headroom for other seeds.
FOUR_BIT_REL_ERROR = {"nf4": 0.12, "fp4": 0.15}


# bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2⁻⁸ of itself (unit roundoff)
BF16_ROUNDOFF = 2.0**-8


def dense_and_4bit(quant_type: str, double_quant: bool, dtype=torch.float32, bias=True, in_features=64):
    torch.manual_seed(0)
    dense = nn.Linear(in_features, 128, bias=bias)
    layer = bnb.nn.Linear4bit(
        in_features,
        128,
        bias=bias,
        compute_dtype=dtype,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    layer.load_state_dict(dense.state_dict())
    return dense, layer.to("cpu")  # moving to a device quantizes


def bf16_absmax_weight(layer: bnb.nn.Linear4bit, with_bf16_absmax) -> torch.Tensor:
    """The weight of a standard-layout layer with every block's absmax rounded to bf16, as packing does."""
    rounded = with_bf16_absmax(layer)
    return bnbf.dequantize_4bit(rounded.weight.data, rounded.weight.quant_state)


def dense_and_8bit():
    torch.manual_seed(0)
    dense = nn.Linear(64, 128)
    layer = bnb.nn.Linear8bitLt(64, 128, has_fp16_weights=False)
    layer.load_state_dict(dense.state_dict())
    return dense, layer.to("cpu")


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("make", [lambda: dense_and_4bit("nf4", True)[1], lambda: dense_and_8bit()[1]])
def test_features_are_a_quantized_linear_layer(make):
    features = plugins.layer_features(make())
    assert (features.kind, features.in_features, features.out_features) == (LINEAR, 64, 128)
    assert features.quantized


@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT)
def test_4bit_read_is_what_the_layer_computes_with(quant_type, double_quant):
    dense, layer = dense_and_4bit(quant_type, double_quant)
    weight = plugins.read_weight(layer)
    assert weight.shape == (128, 64) and weight.dtype == torch.float32
    assert relative_error(weight, dense.weight.detach()) < FOUR_BIT_REL_ERROR[quant_type]
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT)
def test_4bit_write_requantizes_with_the_layers_settings(quant_type, double_quant):
    _, layer = dense_and_4bit(quant_type, double_quant)
    new = torch.randn(128, 64) * 0.1
    plugins.write_weight(layer, new)
    weight = layer.weight
    assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8
    assert (weight.quant_type, weight.blocksize, weight.compress_statistics) == (quant_type, 64, double_quant)
    assert layer.quant_state is weight.quant_state and weight.quant_state.dtype == torch.float32
    assert not weight.requires_grad
    assert relative_error(plugins.read_weight(layer), new) < FOUR_BIT_REL_ERROR[quant_type]
    x = torch.randn(3, 64)
    torch.testing.assert_close(
        layer(x), F.linear(x, plugins.read_weight(layer), layer.bias), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT)
def test_4bit_writing_back_what_was_read_changes_little(quant_type, double_quant):
    # each block's largest weight maps back onto its absmax, so the codes come back the same; only a
    # double-quantized absmax moves, by its own 8-bit rounding
    _, layer = dense_and_4bit(quant_type, double_quant)
    weight = plugins.read_weight(layer)
    plugins.write_weight(layer, weight)
    torch.testing.assert_close(plugins.read_weight(layer), weight, rtol=0, atol=1e-4 if double_quant else 0)


def test_4bit_read_keeps_a_bfloat16_weight_in_bfloat16():
    _, layer = dense_and_4bit("nf4", False, dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(128, 64, dtype=torch.bfloat16), quant_type="nf4", module=layer
    ).to("cpu")
    assert plugins.read_weight(layer).dtype == torch.bfloat16
    plugins.write_weight(layer, torch.randn(128, 64))
    assert layer.weight.quant_state.dtype == torch.bfloat16


# 256 inputs: four blocks per row, where the packed absmax's (blocks, rows) order differs from the standard one
@pytest.mark.parametrize("in_features", [64, 256])
@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT)
def test_4bit_read_of_a_packed_layer_is_its_codes_with_bf16_absmax(
    pack, with_bf16_absmax, quant_type, double_quant, in_features
):
    _, layer = dense_and_4bit(quant_type, double_quant, in_features=in_features)
    standard = plugins.read_weight(layer)
    expected = bf16_absmax_weight(layer, with_bf16_absmax)
    pack(layer)
    codes, absmax = layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()
    weight = plugins.read_weight(layer)
    assert weight.shape == (128, in_features) and weight.dtype == torch.float32
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    assert ((weight - standard).abs() <= BF16_ROUNDOFF * standard.abs()).all()
    # reading leaves the layer as it was: still packed, the same codes and scales
    assert layer.weight.quant_state.packing_format_for_cpu
    assert torch.equal(layer.weight.data, codes) and torch.equal(layer.weight.quant_state.absmax, absmax)
    torch.testing.assert_close(plugins.read_weight(layer), weight, rtol=0, atol=0)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_4bit_read_of_a_packed_layer_keeps_its_dtype_and_storage(pack, with_bf16_absmax, dtype, storage):
    layer = bnb.nn.Linear4bit(256, 128, compute_dtype=None, quant_type="nf4", quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(128, 256, dtype=dtype), quant_type="nf4", quant_storage=storage, module=layer
    ).to("cpu")
    expected = bf16_absmax_weight(layer, with_bf16_absmax)
    pack(layer)  # its quant state now says bfloat16, the kernel's dtype, whatever the weight's was
    weight = plugins.read_weight(layer)
    assert weight.dtype == dtype
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    assert plugins.dense_layer(layer).weight.dtype == dtype  # no compute dtype: the weight's own


@pytest.mark.parametrize("in_features", [64, 256])
@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT)
def test_4bit_write_into_a_packed_layer_quantizes_into_the_standard_layout(
    pack, quant_type, double_quant, in_features
):
    layer = pack(dense_and_4bit(quant_type, double_quant, in_features=in_features)[1])
    new = torch.randn(128, in_features) * 0.1
    plugins.write_weight(layer, new)
    weight = layer.weight
    assert not getattr(weight.quant_state, "packing_format_for_cpu", False)
    assert (weight.quant_type, weight.compress_statistics, weight.quant_state.dtype) == (
        quant_type,
        double_quant,
        torch.float32,
    )
    assert relative_error(plugins.read_weight(layer), new) < FOUR_BIT_REL_ERROR[quant_type]
    x = torch.randn(3, in_features)
    torch.testing.assert_close(
        layer(x), F.linear(x, plugins.read_weight(layer), layer.bias), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT)
def test_packed_kernel_computes_with_the_weight_read_up_to_bf16_rounding(
    packed_kernel, quant_type, double_quant, compute_dtype
):
    in_features = 256
    _, layer = dense_and_4bit(quant_type, double_quant, dtype=compute_dtype, in_features=in_features)
    x = torch.randn(5, in_features)
    layer.eval()
    with torch.no_grad():
        out = layer(x).double()  # this first inference forward packs the layer
    assert layer.weight.quant_state.packing_format_for_cpu
    weight = plugins.read_weight(layer).double()
    bias = layer.bias.double()
    # The kernel rounds x to bf16, may round each code and each code·absmax product to bf16, sums in fp32
    # and rounds the sum to bf16: four roundings of at most u = 2⁻⁸ each, plus fp32's 2⁻²⁴ per term
    # added. So |out − (x·Wᵀ + b)| ≤ (4u + in·2⁻²⁴)·(|x|·|W|ᵀ + |b|), row by row (first order in u).
    gamma = 4 * BF16_ROUNDOFF + in_features * 2.0**-24
    bound = gamma * (x.double().abs() @ weight.abs().T + bias.abs())
    error = (out - (x.double() @ weight.T + bias)).abs()
    assert (error <= bound).all(), f"worst error/bound {(error / bound).max().item():.3g}"


def test_an_inference_forward_packs_as_the_tests_do(packed_kernel, pack):
    _, forwarded = dense_and_4bit("nf4", True, in_features=256)
    _, converted = dense_and_4bit("nf4", True, in_features=256)
    forwarded.eval()
    with torch.no_grad():
        forwarded(torch.randn(2, 256))
    pack(converted)
    assert torch.equal(forwarded.weight.data, converted.weight.data)
    assert torch.equal(forwarded.weight.quant_state.absmax, converted.weight.quant_state.absmax)
    torch.testing.assert_close(plugins.read_weight(forwarded), plugins.read_weight(converted), rtol=0, atol=0)


def test_8bit_read_and_write_round_rows_to_int8():
    dense, layer = dense_and_8bit()
    weight = plugins.read_weight(layer)
    step = (layer.weight.SCB / 127).view(-1, 1)  # one int8 step per row
    assert ((weight - dense.weight.detach()).abs() <= step).all()
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)
    new = torch.randn(128, 64) * 0.1
    plugins.write_weight(layer, new)  # after a forward moved the scales into the matmul state
    assert isinstance(layer.weight, bnb.nn.Int8Params) and layer.weight.dtype == torch.int8
    assert layer.state.SCB is None and layer.state.CB is None
    stored = plugins.read_weight(layer)
    assert ((stored - new).abs() <= (new.abs().amax(1, keepdim=True) / 127)).all()
    torch.testing.assert_close(layer(x), F.linear(x, stored, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: dense_and_4bit("nf4", True)[1], lambda: dense_and_8bit()[1]])
def test_dense_layer_is_an_nn_linear_computing_the_same(make):
    # computing in train mode, where bitsandbytes never packs, so the 4-bit layer computes x·Wᵀ + b exactly
    layer = make()
    dense = plugins.dense_layer(layer)
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
    x = torch.randn(3, 64)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)
    assert plugins.dense_layer(layer, torch.bfloat16).weight.dtype == torch.bfloat16


@pytest.mark.parametrize(("quant_type", "double_quant"), FOUR_BIT)
def test_dense_layer_of_a_packed_layer_holds_its_bf16_absmax_weight(
    pack, with_bf16_absmax, quant_type, double_quant
):
    _, layer = dense_and_4bit(quant_type, double_quant, in_features=256)
    expected = bf16_absmax_weight(layer, with_bf16_absmax)
    dense = plugins.dense_layer(pack(layer))
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
    torch.testing.assert_close(dense.weight.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(dense.bias.detach(), layer.bias.detach(), rtol=0, atol=0)
    assert layer.weight.quant_state.packing_format_for_cpu


def test_dense_layer_takes_the_4bit_compute_dtype_by_default():
    _, layer = dense_and_4bit("nf4", False, dtype=torch.bfloat16, bias=False)
    dense = plugins.dense_layer(layer)
    assert dense.weight.dtype == torch.bfloat16 and dense.bias is None


def test_other_layers_are_left_to_the_core():
    layer = nn.Linear(4, 4)
    assert plugin.peftkit_layer_features(layer) is None
    assert plugin.peftkit_read_weight(layer) is None
    assert plugin.peftkit_write_weight(layer, torch.zeros(4, 4)) is None
    assert plugin.peftkit_dense_layer(layer, None) is None
    assert plugins.dense_layer(layer) is None
