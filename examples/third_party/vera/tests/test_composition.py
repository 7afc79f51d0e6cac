"""VeRA adapters take part in composition blocks through the one class attribute its layer sets: each block
gives what running the adapters alone, and weighing or slicing their outputs by hand, gives."""

from __future__ import annotations

import peftkit
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peftkit import Average, BatchSplit, ConfigError, Fuse, MultiTask
from peftkit.testing.models import randomize_trainable, tiny_llama
from peftkit_vera import VeraConfig

IDS = torch.randint(2, 128, (4, 6), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model():
    model = peftkit.get_peft_model(tiny_llama(), VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    randomize_trainable(model, scale=0.5)
    return model.eval()


def alone(model, name):
    model.set_adapter(name)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def composed(model, block, **kwargs):
    model.set_adapter(block)
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


@settings(max_examples=8, deadline=None)
@given(first=st.integers(0, 4))
def test_batch_split_rows_are_each_adapters_own(model, first):
    out = composed(model, BatchSplit("a", "b", batch_sizes=[first, 4 - first]))
    torch.testing.assert_close(out[:first], alone(model, "a")[:first], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[first:], alone(model, "b")[first:], rtol=1e-5, atol=1e-5)


def test_multitask_rows_follow_their_task_ids(model):
    out = composed(model, MultiTask("a", "b"), task_ids=["b", "a", "a", "b"])
    expected = torch.stack([alone(model, name)[row] for row, name in enumerate(["b", "a", "a", "b"])])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_average_on_one_layer_weighs_the_adapters_outputs():
    # one adapted layer, so the model's output is linear in it: the average of the outputs is exact
    model = peftkit.get_peft_model(
        tiny_llama(), VeraConfig(r=8, target_modules=["layers.1.self_attn.v_proj"]), "a"
    )
    model.add_adapter("b", VeraConfig(r=8, target_modules=["layers.1.self_attn.v_proj"]))
    randomize_trainable(model, scale=0.5)
    model.eval()
    layer = model.get_base_model().model.layers[1].self_attn.v_proj
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outputs = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            outputs[name] = layer(x)
        model.set_adapter(Average("a", "b", weights=[0.3, 0.7]))
        averaged = layer(x)
    torch.testing.assert_close(averaged, 0.3 * outputs["a"] + 0.7 * outputs["b"], rtol=1e-5, atol=1e-6)


def test_fuse_is_refused_naming_what_vera_takes_part_in(model):
    with pytest.raises(
        ConfigError, match="vera adapter, which cannot take part in Fuse .* vera adapters take part in"
    ):
        model.set_adapter(Fuse("a", "b"))
