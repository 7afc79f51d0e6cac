"""VeRA adapters move between peftkit and PEFT (0.21) with the same outputs, both ways.

PEFT is the reference: its saved vectors and shared projections must load here, ours there, and a
``projection_prng_key`` must draw the same A and B in both (that is what makes ``save_projection=False``
files portable).
"""

from __future__ import annotations

import copy
import json

import peft
import peftkit
import pytest
import torch
from peftkit.testing.models import randomize_trainable, tiny_gpt2, tiny_llama
from peftkit_vera import VeraConfig
from safetensors import safe_open

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    # q_proj (32 → 32), v_proj (32 → 16), up_proj (32 → 64), down_proj (64 → 32): A and B are sliced
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])),
    "llama-unsaved-projection": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj"], save_projection=False, projection_prng_key=7),
    ),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


def inputs():
    generator = torch.Generator().manual_seed(1)
    return dict(input_ids=torch.randint(2, 128, (2, 9), generator=generator))


def logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftkit_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    ours = randomize_trainable(peftkit.get_peft_model(base, VeraConfig(r=4, task_type="CAUSAL_LM", **kwargs)))
    expected = logits(ours)
    assert not torch.allclose(expected, logits(pristine), **TOL), "the adapter changes nothing"
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(theirs), expected, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build()
    pristine = copy.deepcopy(base)
    config = peft.VeraConfig(r=4, task_type="CAUSAL_LM", **kwargs)
    theirs = randomize_trainable(peft.get_peft_model(base, config))
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(pristine), **TOL), "the adapter changes nothing"
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(ours), expected, **TOL)


def test_same_key_draws_peft_projections_and_init():
    config = dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"], projection_prng_key=3, d_initial=0.5)
    theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(**config))
    ours = peftkit.get_peft_model(tiny_llama(), VeraConfig(**config))
    layer = ours.base_model.model.model.layers[0].mlp.up_proj
    projections = layer.vera_projections["default"]
    assert projections.vera_A.shape == (4, 32) and projections.vera_B.shape == (64, 4)  # largest in, out
    assert torch.equal(projections.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(projections.vera_B, theirs.base_model.vera_B["default"])
    peft_layer = theirs.base_model.model.model.layers[0].mlp.up_proj
    assert torch.equal(layer.vera_lambda_b["default"], peft_layer.vera_lambda_b["default"])  # zeros
    assert torch.equal(layer.vera_lambda_d["default"], peft_layer.vera_lambda_d["default"])  # d_initial


def test_saved_files_use_peft_key_names_and_config_fields(tmp_path):
    model = peftkit.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    assert "base_model.vera_A" in keys and "base_model.vera_B" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d" in keys
    assert len(keys) == 2 + 2 * 2 * 2  # A, B, then b and d for 2 modules in each of 2 layers
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA"
    assert {k: config[k] for k in ("r", "projection_prng_key", "save_projection", "d_initial")} == {
        "r": 4, "projection_prng_key": 0, "save_projection": True, "d_initial": 0.1,
    }  # fmt: skip

    model = peftkit.get_peft_model(
        tiny_llama(), VeraConfig(r=4, target_modules=["q_proj"], save_projection=False)
    )
    model.save_pretrained(tmp_path / "unsaved")
    with safe_open(str(tmp_path / "unsaved" / "adapter_model.safetensors"), framework="pt") as f:
        assert not any("vera_A" in key or "vera_B" in key for key in f.keys())
