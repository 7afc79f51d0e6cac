"""The layer hooks on bitsandbytes layers: features, dequantized reads, requantized writes, dense copies."""

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

FOUR_BIT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
# ‖W − dequantize(quantize(W))‖ / ‖W‖ for Gaussian-like weights: 4-bit codes leave about 9 % (nf4) to
# 12 % (fp4); int8 rows about 0.4 %. The bounds leave headroom for other seeds.
FOUR_BIT_REL_ERROR = {"nf4": 0.12, "fp4": 0.15}


def dense_and_4bit(quant_type: str, double_quant: bool, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    dense = nn.Linear(64, 128, bias=bias)
    layer = bnb.nn.Linear4bit(
        64, 128, bias=bias, compute_dtype=dtype, quant_type=quant_type, compress_statistics=double_quant
    )
    layer.load_state_dict(dense.state_dict())
    return dense, layer.to("cpu")  # moving to a device quantizes


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


def test_4bit_read_undoes_the_cpu_packing_of_inference_forwards():
    # On CPUs with AVX512-BF16 an inference forward repacks the codes and keeps the absmax in bfloat16.
    _, layer = dense_and_4bit("nf4", False)
    before = plugins.read_weight(layer)
    layer.weight.data, layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    after = plugins.read_weight(layer)
    assert after.shape == (128, 64)
    torch.testing.assert_close(after, before, rtol=1e-2, atol=1e-2)  # bfloat16 absmax
    assert not layer.weight.quant_state.packing_format_for_cpu


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
    layer = make()
    dense = plugins.dense_layer(layer)
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32
    x = torch.randn(3, 64)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)
    assert plugins.dense_layer(layer, torch.bfloat16).weight.dtype == torch.bfloat16


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
