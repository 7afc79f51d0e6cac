"""Dense views of bitsandbytes layers: dequantize to read, requantize to write, rebuild as ``nn.Linear``.

``Linear4bit`` stores W as 4-bit codes (nf4 or fp4) with one absmax per block of ``blocksize`` weights,
the absmaxes themselves 8-bit quantized when double quantization (``compress_statistics``) is on:
W ≈ code[q] · absmax[block]. ``Linear8bitLt`` stores int8 rows with one scale per output row:
W ≈ CB · SCB / 127. Reading gives that approximation of W; writing quantizes a new W with the layer's
own settings, so a merged weight picks up a fresh rounding error.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn


def is_4bit(layer: nn.Module) -> bool:
    return isinstance(layer, bnb.nn.Linear4bit)


def is_8bit(layer: nn.Module) -> bool:
    return isinstance(layer, bnb.nn.Linear8bitLt)


def _standard_layout(layer: bnb.nn.Linear4bit) -> tuple[torch.Tensor, bnbf.QuantState]:
    """The codes and quant state in bitsandbytes' standard layout.

    On CPUs with AVX512-BF16 an inference forward repacks the codes (and their state, in place) for a
    faster kernel; ``dequantize_4bit`` reads only the standard layout, so undo that here as
    bitsandbytes does before saving. The next inference forward packs them again.
    """
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )
        layer.quant_state = weight.quant_state
    return weight.data, weight.quant_state


def read_4bit(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """W as ``(out, in)`` in the dtype it was quantized from."""
    codes, state = _standard_layout(layer)
    return bnbf.dequantize_4bit(codes, state)


def write_4bit(layer: bnb.nn.Linear4bit, weight: torch.Tensor) -> None:
    """Quantize ``weight`` with the layer's quant type, block size, double quantization and storage dtype."""
    old = layer.weight
    _, old_state = _standard_layout(layer)
    dense = weight.detach().to(device=old.device, dtype=old_state.dtype).contiguous()
    codes, state = bnbf.quantize_4bit(
        dense,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
    )
    layer.weight = bnb.nn.Params4bit(
        codes,
        requires_grad=False,
        quant_state=state,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = state


def _8bit_codes_and_scales(layer: bnb.nn.Linear8bitLt) -> tuple[torch.Tensor, torch.Tensor]:
    # the scales live on the weight until the first forward moves them to the layer's matmul state
    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return layer.weight.data, scales


def read_8bit(layer: bnb.nn.Linear8bitLt) -> torch.Tensor:
    """W as ``(out, in)`` in float32 (the layer's own dense weight where it keeps one)."""
    if layer.weight.dtype != torch.int8:
        return layer.weight.data
    codes, scales = _8bit_codes_and_scales(layer)
    return bnbf.int8_vectorwise_dequant(codes, scales.to(codes.device))


def write_8bit(layer: bnb.nn.Linear8bitLt, weight: torch.Tensor) -> None:
    """Quantize ``weight`` row by row to int8, as bitsandbytes does when it loads the layer."""
    old = layer.weight
    if old.dtype != torch.int8:
        old.data.copy_(weight)
        return
    # bitsandbytes quantizes from float16, so a weight goes through the same rounding as at load time
    codes, scales, _ = bnbf.int8_vectorwise_quant(weight.detach().to(device=old.device, dtype=torch.float16))
    layer.weight = bnb.nn.Int8Params(
        codes, requires_grad=False, has_fp16_weights=old.has_fp16_weights, CB=codes, SCB=scales
    )
    layer.state.reset_grads()
    layer.state.CB, layer.state.SCB = None, None


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the layer computes in: ``compute_dtype`` for 4-bit (else its quantized-from dtype), float32 for 8-bit."""
    if is_4bit(layer):
        return layer.compute_dtype or _standard_layout(layer)[1].dtype
    return torch.float32


def dense_linear(layer: nn.Module, dtype: torch.dtype | None) -> nn.Linear:
    """A full-precision ``nn.Linear`` with the layer's dequantized weight and its bias."""
    dtype = dtype or compute_dtype(layer)
    weight = read_4bit(layer) if is_4bit(layer) else read_8bit(layer)
    bias = layer.bias
    dense = nn.Linear(
        layer.in_features, layer.out_features, bias=bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.requires_grad_(layer.weight.requires_grad)
    return dense
