"""IA3 adapters move between peftkit and PEFT with the same outputs, both ways."""

from __future__ import annotations

import copy
import json

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from peftkit_ia3 import IA3Config

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    # output scaling on attention projections, input scaling on the MLP's down projection
    "llama": (
        tiny_llama,
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "llama-defaults": (tiny_llama, dict()),
    "llama-all-linear": (
        tiny_llama,
        dict(target_modules="all-linear", feedforward_modules=r".*mlp\.down_proj"),
    ),
    # transformers' Conv1D (fan_in_fan_out), with biases: output scaling scales the bias too
    "gpt2": (
        tiny_gpt2,
        dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    ),
    "gpt2-defaults": (tiny_gpt2, dict()),
    # a classification head trains and is saved with the adapter
    "bert-seq-cls": (tiny_bert, dict(task_type="SEQ_CLS")),
    # PEFT's T5 default scales the input of the feed-forward output projection "wo"
    "t5-defaults": (tiny_t5, dict(task_type="SEQ_2_SEQ_LM")),
}


def inputs(model):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    if getattr(model.config, "is_encoder_decoder", False):
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])
    return dict(input_ids=ids, attention_mask=mask)


def logits(model):
    with torch.no_grad():
        return model(**inputs(model)).logits


def trained(model, seed=2):
    """Adapter vectors around 1 and heads moved, as training leaves them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * 0.3
                param.copy_(1 + noise if "ia3_l" in name else param + noise)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = trained(peftkit.get_peft_model(base, IA3Config(**kwargs)))
    expected = logits(ours)
    assert not torch.allclose(expected, logits(pristine), **TOL)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(theirs), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    theirs = trained(peft.get_peft_model(base, peft.IA3Config(**kwargs)))
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(pristine), **TOL)
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(ours), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_layers_same_shapes_and_same_merge_as_peft(case):
    build, kwargs = CASES[case]
    base = build()
    theirs = trained(peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs)))
    ours = peftkit.get_peft_model(base, IA3Config(**kwargs))
    their_vectors = {
        name.replace(".default", ""): p for name, p in theirs.named_parameters() if "ia3_l" in name
    }
    our_vectors = {name.replace(".default", ""): p for name, p in ours.named_parameters() if "ia3_l" in name}
    assert {k: tuple(v.shape) for k, v in our_vectors.items()} == {
        k: tuple(v.shape) for k, v in their_vectors.items()
    }
    with torch.no_grad():
        for name, param in our_vectors.items():
            param.copy_(their_vectors[name])
        for name, param in ours.named_parameters():
            if param.requires_grad and "ia3_l" not in name:
                param.copy_(dict(theirs.named_parameters())[name])
    merged_theirs = theirs.merge_and_unload()
    merged_ours = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged_ours), logits(merged_theirs), **TOL)
    torch.testing.assert_close(merged_ours.state_dict(), merged_theirs.state_dict(), **TOL)


def test_saved_files_use_peft_key_names_shapes_and_config_fields(tmp_path):
    from safetensors import safe_open

    model = peftkit.get_peft_model(tiny_gpt2(), IA3Config())
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        metadata = handle.metadata()
    assert shapes == {
        f"base_model.model.transformer.h.{i}.{path}.ia3_l": shape
        for i in (0, 1)
        for path, shape in (("attn.c_attn", (96, 1)), ("mlp.c_proj", (1, 128)))
    }
    assert metadata["peftkit.method"] == "ia3" and metadata["peftkit.plugin"] == "peftkit-ia3"

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) <= set(peft.IA3Config().to_dict())
    assert config["peft_type"] == "IA3"
    assert config["target_modules"] == ["c_attn", "mlp.c_proj"]
    assert config["feedforward_modules"] == ["mlp.c_proj"]
    assert config["fan_in_fan_out"] is True  # recorded for the Conv1D layers, as PEFT does
