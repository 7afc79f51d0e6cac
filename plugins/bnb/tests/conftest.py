"""Quantized tiny Llamas loaded the way users load them: transformers' BitsAndBytesConfig, device_map."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

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
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def pytest_generate_tests(metafunc):
    """Tests name what they run over: ``kind`` (every bitsandbytes setting), ``four_bit_kind``, ``device``."""
    own = {
        name.strip()
        for marker in metafunc.definition.iter_markers("parametrize")
        for name in (marker.args[0].split(",") if isinstance(marker.args[0], str) else marker.args[0])
    }
    for name, values in (("kind", ALL_KINDS), ("four_bit_kind", FOUR_BIT), ("device", DEVICES)):
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
