"""LoRA's LoftQ init (``init_lora_weights="loftq"``) with bitsandbytes, on the CPU.

After the init the base layer holds Q, a weight bitsandbytes represents exactly, and Q + s·BA is the
rank-r fit of W; saved and loaded back in 4-bit or 8-bit, the base holds Q bit for bit.
"""

from __future__ import annotations

import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import PeftModel, get_peft_model
from peftkit.testing.models import tiny_llama
from peftkit_lora import LoftQConfig, LoraConfig
from peftkit_lora.init import loftq_factors

pytestmark = pytest.mark.numerics

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nf4(weight: torch.Tensor) -> torch.Tensor:
    """NF4 as a loaded 4-bit layer holds it (transformers' defaults: blocks of 64, no double quantization)."""
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    return bnbf.dequantize_4bit(packed, state)


def int8(weight: torch.Tensor) -> torch.Tensor:
    """int8 as a loaded 8-bit layer holds it (bitsandbytes' Int8Params quantizes from float16)."""
    codes, scales, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
    return bnbf.int8_vectorwise_dequant(codes, scales).float()


def round_trip(bits: int, weight: torch.Tensor) -> torch.Tensor:
    return nf4(weight) if bits == 4 else int8(weight)


def int8_rounding(bits: int, weight: torch.Tensor) -> float:
    return 0.0 if bits == 4 else 4 * 2**-24 * weight.abs().max().item()


@settings(max_examples=25, deadline=None)
@given(
    out_blocks=st.integers(1, 3),
    in_blocks=st.integers(1, 3),
    r=st.integers(1, 16),
    scaling=st.sampled_from([0.5, 1.0, 2.0]),
    bits=st.sampled_from([4, 8]),
    iterations=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_q_is_quantized_exactly_and_the_adapter_is_the_best_rank_r_fit_of_what_it_lost(
    out_blocks, in_blocks, r, scaling, bits, iterations, seed
):
    weight = torch.randn(16 * out_blocks, 64 * in_blocks, generator=torch.Generator().manual_seed(seed))
    a, b, q = loftq_factors(weight, r, scaling, bits, iterations)
    # the base's weight survives quantizing as it is: NF4 exactly; int8 within a few roundings of its
    # largest element, as bitsandbytes scales each code by absmax / 127 in float32
    torch.testing.assert_close(round_trip(bits, q), q, rtol=0, atol=int8_rounding(bits, q))
    residual = weight - q
    fitted = weight - (q + scaling * b @ a)
    # Eckart-Young: the rank-r fit leaves exactly the residual's other singular values
    rest = torch.linalg.svdvals(residual.double())[r:]
    # (at full rank nothing is left but the float32 rounding of q + s·B A, a few units of ‖W‖'s roundoff)
    roundoff = 4 * torch.finfo(torch.float32).eps * weight.norm().item()
    torch.testing.assert_close(fitted.double().norm(), rest.norm(), rtol=1e-4, atol=roundoff)
    assert fitted.norm() < residual.norm()
    assert a.shape == (r, weight.shape[1]) and b.shape == (weight.shape[0], r)


def test_one_iteration_agrees_with_peft_s_decomposition_at_scale_one():
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    a, b, q = loftq_factors(weight, 8, 1.0, 4, 1)
    torch.testing.assert_close(q, nf4(weight), rtol=0, atol=0)
    theirs = _low_rank_decomposition(weight - q, reduced_rank=8)
    torch.testing.assert_close(b @ a, theirs["L"] @ theirs["R"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_loftq_model_saved_and_loaded_quantized_holds_q_and_is_closer_to_the_full_model(tmp_path, bits):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    full = tiny_llama(hidden_size=64)
    tokens = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    full.save_pretrained(tmp_path / "full")
    with torch.no_grad():
        expected = full(input_ids=tokens).logits

    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights="loftq", loftq_config=LoftQConfig(bits)
    )
    peft_model = get_peft_model(tiny_llama(hidden_size=64), config)
    q = {name: layer.get_base_layer().weight.detach().clone() for name, layer in peft_model.adapter_layers()}
    peft_model.save_pretrained(tmp_path / "adapter")
    # saved as PEFT's LoftQ recipe saves it: loading onto the quantized base must not fit A and B again
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["init_lora_weights"], saved["loftq_config"]) == (True, {})
    peft_model.unload().save_pretrained(tmp_path / "base-q")

    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )

    def load(folder):
        # float32, the dtype Q was saved in (transformers 4.57 would load the weights as float16 first)
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )

    loaded = PeftModel.from_pretrained(load(tmp_path / "base-q"), tmp_path / "adapter")
    for name, layer in loaded.adapter_layers():
        weight = layer.get_base_layer().weight
        held = (
            bnbf.dequantize_4bit(weight.data, weight.quant_state)
            if bits == 4
            else bnbf.int8_vectorwise_dequant(weight.data, weight.SCB)
        )
        torch.testing.assert_close(held, q[name], rtol=0, atol=int8_rounding(bits, q[name]))

    plain = load(tmp_path / "full")  # the usual QLoRA start: W quantized, B = 0
    loaded.train()  # bitsandbytes' exact path (no packing) and the same for both; dropout is 0
    plain.train()
    with torch.no_grad():
        with_loftq = loaded(input_ids=tokens).logits
        without = plain(input_ids=tokens).logits
    assert (with_loftq - expected).norm() < 0.9 * (without - expected).norm()


def test_a_quantized_base_is_refused_with_what_to_do(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden_size=64).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    )
    config = LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=LoftQConfig())
    with pytest.raises(ValueError, match="apply LoftQ to the model before quantizing it"):
        get_peft_model(base, config)
