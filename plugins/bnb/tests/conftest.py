"""Quantized tiny Llamas loaded the way users load them: transformers' BitsAndBytesConfig, device_map.

bitsandbytes keeps a 4-bit layer in one of two layouts on the CPU: the standard one, and on CPUs with
AVX512-BF16 the *packed* one that its first forward in eval mode without grad converts the layer to,
for a bf16 kernel (see ``peftkit_bnb.layers``). Tests that read, merge or save weights run over both
(``layout``) on every CPU: :func:`pack` converts a model with the very function that forward calls, so
the packed layout exists everywhere. Only computing with it needs the kernel: a test that does asks for
the ``packed_kernel`` fixture, which skips it (and only it) on other CPUs. Exact references compute in
train mode, where bitsandbytes never packs.
"""

from __future__ import annotations

import copy
import logging
import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

# PEFTKIT_BNB_NO_PACKED_KERNEL=1 runs these tests as on a CPU without AVX512-BF16, where bitsandbytes has
# no packed 4-bit kernel: its layers never pack on their own, and the tests that compute with the kernel
# skip. ./dev.sh sets it for its second pass, so a machine with the kernel tests the other path too.
SIMULATED_CPU = os.environ.get("PEFTKIT_BNB_NO_PACKED_KERNEL") == "1"
if SIMULATED_CPU:
    bnbf.has_avx512bf16 = bnb.nn.modules.has_avx512bf16 = lambda: False  # read when a layer is made

BNB_SETTINGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
FOUR_BIT = ["nf4", "nf4-dq", "fp4", "fp4-dq"]
ALL_KINDS = FOUR_BIT + ["int8"]
HIDDEN = 64  # bitsandbytes quantizes in blocks of 64 weights
LAYOUTS = ["standard", "packed"]
# (kind, layout): every setting in the standard layout, the 4-bit ones packed as well (int8 has one layout)
KIND_LAYOUTS = [(kind, "standard") for kind in ALL_KINDS] + [(kind, "packed") for kind in FOUR_BIT]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def pytest_generate_tests(metafunc):
    """Tests name what they run over: ``kind`` (every bitsandbytes setting), ``four_bit_kind``, ``device``,
    ``layout`` (with ``kind``: the pairs of ``KIND_LAYOUTS``; else both layouts)."""
    own = {
        name.strip()
        for marker in metafunc.definition.iter_markers("parametrize")
        for name in (marker.args[0].split(",") if isinstance(marker.args[0], str) else marker.args[0])
    }
    names = set(metafunc.fixturenames) - own
    if {"kind", "layout"} <= names:
        metafunc.parametrize("kind,layout", KIND_LAYOUTS, ids=[f"{k}-{layout}" for k, layout in KIND_LAYOUTS])
        own |= {"kind", "layout"}
    for name, values in (
        ("kind", ALL_KINDS),
        ("four_bit_kind", FOUR_BIT),
        ("layout", LAYOUTS),
        ("device", DEVICES),
    ):
        if name in metafunc.fixturenames and name not in own:
            metafunc.parametrize(name, values)


@pytest.fixture(autouse=True)
def _quiet_loading():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # bitsandbytes says on every 8-bit call that it casts float32 inputs to float16
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    yield


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    """A tiny Llama with random weights saved as a transformers checkpoint (hidden size 64)."""
    from peftkit.testing.models import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(hidden_size=HIDDEN).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def _loaded(llama_folder):
    cache = {}

    def load(kind: str, device: str, compute_dtype: torch.dtype) -> torch.nn.Module:
        key = (kind, device, compute_dtype)
        if key not in cache:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            settings = dict(BNB_SETTINGS[kind])
            if kind != "int8":
                settings["bnb_4bit_compute_dtype"] = compute_dtype
            cache[key] = AutoModelForCausalLM.from_pretrained(
                llama_folder,
                quantization_config=BitsAndBytesConfig(**settings),
                device_map=device,
                dtype=compute_dtype,  # the layers bitsandbytes leaves alone (norms, embeddings, head)
            )
        return cache[key]

    return load


@pytest.fixture
def load_quantized(_loaded):
    """``load_quantized(kind, device="cpu")``: a fresh quantized model (a copy of one loaded per session).

    Quantization is deterministic, so every copy, and every separate load, holds the same weights.
    """

    def load(kind: str, device: str = "cpu", compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return copy.deepcopy(_loaded(kind, device, compute_dtype))

    return load


@pytest.fixture
def tokens():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, 128, (2, 12), generator=generator)


def four_bit_layers(model: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def pack(model: torch.nn.Module) -> torch.nn.Module:
    """Put every 4-bit layer of ``model`` (a model or one layer) in the packed layout, as its first inference forward does on a
    CPU with AVX512-BF16 (``Linear4bit.forward`` calls this very function on the weight and its state)."""
    for layer in four_bit_layers(model):
        weight = layer.weight
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    return model


def with_bf16_absmax(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a model (or one layer) in the standard layout whose 4-bit layers hold the weights packing leaves them
    with: the same codes, each block's absmax (dequantized first if double-quantized) rounded to bf16.

    Computed in train mode it is the exact reference for the packed model, built with bitsandbytes'
    public functions only, independently of how peftkit reads a packed layer.
    """
    copied = copy.deepcopy(model)
    for layer in four_bit_layers(copied):
        state = layer.weight.quant_state
        assert not getattr(state, "packing_format_for_cpu", False), "build the reference before packing"
        absmax = (
            bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
            if state.nested
            else state.absmax
        )
        rounded = bnbf.QuantState(
            absmax=absmax.to(torch.bfloat16).float(),
            shape=state.shape,
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )
        layer.weight.quant_state = layer.quant_state = rounded
    return copied


def exact_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Outputs through bitsandbytes' exact path: train mode (dropout is 0 in these tests), no grad."""
    model.train()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def in_layout(model: torch.nn.Module, layout: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``model`` in ``layout``, and the exact reference for it (to compute in train mode): the model
    itself as it was for the standard layout, :func:`with_bf16_absmax` of it for the packed one."""
    if layout == "standard":
        return model, model
    reference = with_bf16_absmax(model)
    return pack(model), reference


# The packed kernel computes in bf16 (8 significant bits, so rounding moves a value by at most u = 2⁻⁸
# of itself): it rounds x and its result to bf16, each adding up to u relative to the layer's output;
# the weight's roundings, one per term, mostly cancel over a dot product. test_layers bounds a layer
# rigorously, by 4u relative to |x|·|W|ᵀ, and measures under a tenth of that. Relative errors add up
# along the quantized layers on the longest path through the tiny Llama, 8 (q/k/v, o, gate/up, down in
# each of 2 blocks), which its norms and attention do not amplify: 8 · 2u = 1/16 on the logits, relative
# to their largest.
# Measured 0.0016-0.0027 with trained LoRA and DoRA adapters (test_merge), 0.0056-0.0067 with random
# DoRA ones (test_peft_interop), over every 4-bit setting.
PACKED_MODEL_ERROR = 8 * 2 * 2.0**-8


@pytest.fixture
def packed_kernel() -> float:
    """Skips the test on a CPU where bitsandbytes has no packed 4-bit kernel; else gives the bound on the
    relative error of a tiny Llama's logits computed through it (``PACKED_MODEL_ERROR``)."""
    if not bnbf.has_avx512bf16():
        lacks = "PEFTKIT_BNB_NO_PACKED_KERNEL=1 says this CPU lacks" if SIMULATED_CPU else "this CPU lacks"
        pytest.skip(
            f"bitsandbytes computes with the packed 4-bit layout only on CPUs with AVX512-BF16, which {lacks}; "
            "the packed layout's reading, merging and saving are still tested here"
        )
    return PACKED_MODEL_ERROR


@pytest.fixture(name="pack")
def _pack():
    """:func:`pack`."""
    return pack


@pytest.fixture(name="with_bf16_absmax")
def _with_bf16_absmax():
    """:func:`with_bf16_absmax`."""
    return with_bf16_absmax


@pytest.fixture(name="exact_logits")
def _exact_logits():
    """:func:`exact_logits`."""
    return exact_logits


@pytest.fixture(name="in_layout")
def _in_layout():
    """:func:`in_layout`."""
    return in_layout
