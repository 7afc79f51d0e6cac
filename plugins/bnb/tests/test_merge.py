"""Merging into quantized bases: requantized in place, or dequantized to nn.Linear first.

Requantizing the merged weight rounds W_q + ΔW to the 4-bit grid again, so outputs move by about one
quantization step. Measured on the CPU (tiny Llama, hidden 64, LoRA r=8 on all linear layers trained 8
steps at lr 1e-2, three seeds; max |merged − unmerged| / max |unmerged|): see ``REQUANTIZE_ERROR``
for the bounds and docs/quantization.md for the figures. ``PEFTKIT_BNB_REPORT=1 pytest -s`` prints them.

Every merge runs over both 4-bit layouts (conftest.py). The reference is exact on every CPU: the
unmerged model computed in train mode, where bitsandbytes never packs (for a packed model, a copy whose
layers hold the packed weights in the standard layout). The inference kernels (the packed bf16 one,
int8's) are compared with the dequantized merge separately, within their own rounding.
"""

from __future__ import annotations

import os

import bitsandbytes as bnb
import pytest
import torch
from peftkit import AdapterLayer, LoraConfig, get_peft_model
from torch import nn

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

# Bounds on the relative error that merge_and_unload() with requantization adds. Measured over adapter
# seeds 0-2: nf4 0.041-0.080, nf4-dq 0.049-0.082, fp4 0.077-0.099, fp4-dq 0.080-0.100, int8 0.0040-0.0050
# (0.115 for nf4 with another init; packed 4-bit layers within 0.005 of these): about one 4-bit step,
# so the bound is twice that.
REQUANTIZE_ERROR = {"nf4": 0.2, "nf4-dq": 0.2, "fp4": 0.2, "fp4-dq": 0.2, "int8": 0.02}


def trained_adapter(base, tokens, use_dora=False, seed=0):
    """LoRA (or DoRA) on every linear layer, trained 8 steps; left in train mode, so nothing is packed."""
    torch.manual_seed(seed)  # the adapter's init, so the measured error does not depend on test order
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", use_dora=use_dora))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(8):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    error = ((approx - exact).abs().max() / exact.abs().max()).item()
    if os.environ.get("PEFTKIT_BNB_REPORT"):
        print(f"relative error {error:.3g}")
    return error


def linear_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# three adapter seeds in the standard layout, where the bounds were measured; one in the packed layout
REQUANTIZE_CASES = [
    pytest.param(kind, layout, seed, id=f"{kind}-{layout}-{seed}")
    for kind in REQUANTIZE_ERROR
    for layout, seeds in (("standard", [0, 1, 2]), ("packed", [] if kind == "int8" else [0]))
    for seed in seeds
]


@pytest.mark.parametrize(("kind", "layout", "seed"), REQUANTIZE_CASES)
def test_merge_and_unload_requantizes_within_the_stated_error(
    load_quantized, tokens, in_layout, exact_logits, kind, layout, seed
):
    model, reference = in_layout(trained_adapter(load_quantized(kind), tokens, seed=seed), layout)
    unmerged = exact_logits(reference, tokens)
    merged = model.merge_and_unload()
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert sum(isinstance(m, quantized) for m in merged.modules()) == 14  # 7 per block, 2 blocks
    assert relative_error(exact_logits(merged, tokens), unmerged) < REQUANTIZE_ERROR[kind]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_dequantize_merge_gives_nn_linear_with_the_unmerged_outputs(
    load_quantized, tokens, kind, layout, in_layout, exact_logits, device, use_dora
):
    if device != "cpu" and layout == "packed":
        pytest.skip("bitsandbytes packs 4-bit layers on the CPU only")
    tokens = tokens.to(device)
    model, reference = in_layout(trained_adapter(load_quantized(kind, device), tokens, use_dora), layout)
    unmerged = exact_logits(reference, tokens)
    with torch.no_grad():
        merged = model.merge_and_unload(dequantize=True)
    layers = linear_layers(merged)
    assert len(layers) == 15 and all(type(m) is nn.Linear for m in layers)  # 14 + lm_head
    assert all(m.weight.dtype == torch.float32 for m in layers)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    # In train mode every quantized layer computes x·dequantize(W)ᵀ in fp32, as the dense layers do
    # (measured at most 3.4e-7); a packed layer's W is its codes with bf16-rounded absmaxes
    assert relative_error(exact_logits(merged, tokens), unmerged) < 1e-5


# int8's inference kernel also rounds the activations row by row to int8 (LLM.int8(), outliers above 6
# kept in fp16): measured 4.4e-3 to 4.6e-3.
INT8_KERNEL_ERROR = 1e-2


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_inference_of_an_adapted_model_equals_the_dequantized_merge(
    load_quantized, tokens, exact_logits, kind, use_dora
):
    """Layers that carry adapters stay out of bitsandbytes' packed CPU layout (its kernel has no backward:
    see test_qlora), so an eval forward computes exactly what the dequantized merge does, on every CPU.
    int8's inference kernel rounds the activations too: its own bound."""
    model = trained_adapter(load_quantized(kind), tokens, use_dora)
    model.eval()
    with torch.no_grad():
        inference = model(input_ids=tokens).logits
        four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)
        merged = model.merge_and_unload(dequantize=True)
    bound = INT8_KERNEL_ERROR if kind == "int8" else 1e-5
    assert relative_error(inference, exact_logits(merged, tokens)) < bound


def test_dequantized_model_saves_and_loads_as_a_plain_model(load_quantized, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    model = trained_adapter(load_quantized("nf4"), tokens)
    merged = model.merge_and_unload(dequantize=True)
    assert getattr(merged.config, "quantization_config", None) is None
    assert not getattr(merged, "is_loaded_in_4bit", False) and getattr(merged, "hf_quantizer", None) is None
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(type(m) is nn.Linear for m in linear_layers(reloaded))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, merged(input_ids=tokens).logits)


def test_dequantize_takes_a_dtype(load_quantized, tokens):
    model = trained_adapter(load_quantized("nf4"), tokens)
    merged = model.merge_and_unload(dequantize=True, dtype=torch.bfloat16)
    assert {m.weight.dtype for m in linear_layers(merged) if m is not merged.lm_head} == {torch.bfloat16}
