"""Dense views of bitsandbytes layers: dequantize to read, requantize to write, rebuild as ``nn.Linear``.

``Linear4bit`` stores W as 4-bit codes (nf4 or fp4) with one absmax per block of ``blocksize`` weights,
the absmaxes themselves 8-bit quantized when double quantization (``compress_statistics``) is on:
W ≈ code[q] · absmax[block]. ``Linear8bitLt`` stores int8 rows with one scale per output row:
W ≈ CB · SCB / 127. Reading gives that approximation of W; writing quantizes a new W with the layer's
own settings, so a merged weight picks up a fresh rounding error.

On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer on its first forward in eval mode without
grad (the *packed* layout, ``quant_state.packing_format_for_cpu``) and from then on computes every
forward, in train mode too, through a bf16 kernel: the codes are reordered for that kernel and the
absmaxes become one bfloat16 matrix ``(in / blocksize, out)`` (a double-quantized absmax is dequantized
first). So the weight of a packed layer is code[q] · bf16(absmax), within 2⁻⁸ relative of the weight
before packing, block by block; the kernel computes with it in bf16 (docs/quantization.md says what
that does to outputs). Reading a packed layer gives exactly that weight, decoded from the packed layout
without touching the layer, so a read never changes what the layer computes next. bitsandbytes' own
way back (``_convert_weight_packed_for_cpu_inverse``, which its ``state_dict`` calls) is not used: it
changes the layer in place, requantizes a double-quantized absmax (moving the weight again), and leaves
any other absmax transposed, which scrambles the blocks of a layer with more than ``blocksize`` inputs.
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


def is_packed(layer: bnb.nn.Linear4bit) -> bool:
    """Whether the layer's codes are in bitsandbytes' packed CPU layout (see the module docstring)."""
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def _quantized_dtype(state: bnbf.QuantState) -> torch.dtype:
    """The dtype the weight was quantized from (a packed state says bfloat16, its kernel's dtype)."""
    if getattr(state, "packing_format_for_cpu", False):
        return state.original_dtype
    return state.dtype


def _standard_codes(packed: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """The codes of a packed layer in the standard layout, two 4-bit codes per byte in row-major order.

    The packed ``(out, in / 2)`` bytes hold groups of 64 codes (32 low nibbles, then 32 high ones),
    each group a 32-row by 2-column tile of the ``(out, in)`` code matrix.
    """
    rows, cols = state.shape
    tile_rows = 32  # bitsandbytes packs with block_n=32
    groups = packed.reshape(-1, tile_rows)
    tiles = torch.cat([groups & 0xF, groups >> 4], dim=1)
    codes = tiles.reshape(rows // tile_rows, cols // 2, tile_rows, 2).transpose(1, 2).reshape(-1)
    standard = ((codes[0::2] << 4) | codes[1::2]).reshape(state.original_qshape)
    storage = getattr(state, "original_storage_type", None)
    return standard.view(storage) if storage is not None else standard


def _standard_state(state: bnbf.QuantState) -> bnbf.QuantState:
    """A packed layer's quant state in the standard layout: its bf16 absmaxes as float32, block by block."""
    return bnbf.QuantState(
        # the packed absmax is (in / blocksize, out); the standard order is block by block along each row
        absmax=state.absmax.T.reshape(-1).float().contiguous(),
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=_quantized_dtype(state),
    )


def _packed_weight(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """code[q] · bf16(absmax) from a packed layer, without changing it."""
    state = layer.weight.quant_state
    return bnbf.dequantize_4bit(_standard_codes(layer.weight.data, state), _standard_state(state))


def _set_4bit(layer: bnb.nn.Linear4bit, codes: torch.Tensor, state: bnbf.QuantState) -> None:
    """Give the layer new codes and quant state, with the settings of the weight it had."""
    old = layer.weight
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


def keep_unpacked(layer: bnb.nn.Linear4bit) -> None:
    """Keep a layer that carries adapters in the standard layout, whose forward has a backward.

    The packed kernel has none: once a layer is packed (by any forward in eval mode without grad, such
    as an evaluation loop's), a training forward through it gives no gradient to its input, so every
    adapter below it trains on a wrong gradient. So bitsandbytes is told not to pack this layer, and a
    layer it packed already is put back in the standard layout exactly: the same codes, and the
    bfloat16-rounded absmaxes as float32 (not quantized again), so it computes with the weight it had.
    """
    layer.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward before it packs
    if is_packed(layer):
        packed = layer.weight
        _set_4bit(
            layer, _standard_codes(packed.data, packed.quant_state), _standard_state(packed.quant_state)
        )


def read_4bit(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """W as ``(out, in)`` in the dtype it was quantized from: the weight the layer computes with.

    For a packed layer that is the codes with the bfloat16-rounded absmaxes the packed kernel uses.
    """
    if is_packed(layer):
        return _packed_weight(layer)
    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def write_4bit(layer: bnb.nn.Linear4bit, weight: torch.Tensor) -> None:
    """Quantize ``weight`` with the layer's quant type, block size, double quantization and storage dtype."""
    old = layer.weight
    dense = weight.detach().to(device=old.device, dtype=_quantized_dtype(old.quant_state)).contiguous()
    codes, state = bnbf.quantize_4bit(
        dense,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
    )
    _set_4bit(layer, codes, state)


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
        return layer.compute_dtype or _quantized_dtype(layer.weight.quant_state)
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
