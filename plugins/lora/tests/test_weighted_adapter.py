"""add_weighted_adapter: every combination type gives PEFT's adapter; two active adapters equal their cat."""

from __future__ import annotations

import copy

import peft
import peftkit
import pytest
import torch
from peftkit import AdapterNameError, ConfigError
from peftkit.testing.models import randomize_trainable, tiny_llama, tiny_plain
from peftkit_lora import LoraConfig

pytestmark = pytest.mark.numerics  # also run under torch's generic CPU kernels (dev.sh)

TOL = dict(rtol=1e-5, atol=1e-5)
KWARGS = {
    "cat": {},
    "linear": {},
    "svd": {},
    "ties": dict(density=0.5),
    "ties_svd": dict(density=0.6, majority_sign_method="frequency"),
    "magnitude_prune": dict(density=0.7),
    "magnitude_prune_svd": dict(density=0.7, svd_rank=3),
    "dare_linear": dict(density=0.5),
    "dare_ties": dict(density=0.4),
    "dare_linear_svd": dict(density=0.5, svd_clamp=0.99),
}


def ids():
    return torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def output(model):
    with torch.no_grad():
        out = model(input_ids=ids())
    return out if isinstance(out, torch.Tensor) else out.logits


def two_adapters(build, first, second, tmp_path):
    """Our model and PEFT's, each holding the same two trained adapters 'default' and 'b'."""
    base = build()
    pristine = copy.deepcopy(base)
    ours = peftkit.get_peft_model(base, LoraConfig(**first))
    ours.add_adapter("b", LoraConfig(**second))
    randomize_trainable(ours, seed=2)
    ours.set_adapter("b")
    randomize_trainable(ours, seed=3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(pristine, tmp_path)
    theirs.load_adapter(tmp_path / "b", "b")
    return ours, theirs


@pytest.mark.parametrize("combination_type", sorted(KWARGS))
def test_each_combination_gives_the_adapter_peft_gives(combination_type, tmp_path):
    ours, theirs = two_adapters(
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj"]),
        tmp_path,
    )
    kwargs = KWARGS[combination_type]
    for model in (ours, theirs):
        torch.manual_seed(7)  # DARE drops entries at random: same seed, same draws as PEFT
        model.add_weighted_adapter(
            ["default", "b"], [0.7, -0.4], "mix", combination_type=combination_type, **kwargs
        )
        model.set_adapter("mix")
    torch.testing.assert_close(output(ours), output(theirs), **TOL)
    assert ours.peft_config["mix"].target_modules == ["o_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_conv_and_embedding_layers_combine_as_in_peft(combination_type, tmp_path):
    # PEFT's svd reshapes only Conv2d deltas, so its svd fails on a Conv1d: compared without the conv there
    targets = ["embed", "fc1"] if combination_type == "svd" else ["embed", "conv", "fc1"]
    config = dict(r=3, lora_alpha=6, target_modules=targets)
    ours, theirs = two_adapters(tiny_plain, config, {**config, "lora_alpha": 3}, tmp_path)
    for model in (ours, theirs):
        model.add_weighted_adapter(["default", "b"], [0.5, 1.5], "mix", combination_type=combination_type)
        model.set_adapter("mix")
    torch.testing.assert_close(output(ours), output(theirs), **TOL)


def test_two_active_adapters_equal_their_cat_combination():
    model = peftkit.get_peft_model(
        tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    model.add_adapter(
        "b", LoraConfig(r=5, lora_alpha=3, use_rslora=True, target_modules=["v_proj", "up_proj"])
    )
    randomize_trainable(model)
    model.set_adapter("b")
    randomize_trainable(model, seed=5)
    model.set_adapter(["default", "b"])
    together = output(model)
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "cat", combination_type="cat")
    model.set_adapter("cat")
    assert model.peft_config["cat"].r == 7
    torch.testing.assert_close(output(model), together, **TOL)
    with model.disable_adapter():
        assert not torch.allclose(output(model), together)


def test_cat_with_weights_is_exactly_the_weighted_sum_of_deltas():
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"]))
    randomize_trainable(model)
    model.set_adapter("b")
    randomize_trainable(model, seed=9)
    model.add_weighted_adapter(["default", "b"], [2.0, -0.5], "mix", combination_type="cat")
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    expected = 2.0 * layer.delta_weight("default") - 0.5 * layer.delta_weight("b")
    torch.testing.assert_close(layer.delta_weight("mix"), expected, rtol=1e-5, atol=1e-6)


def test_svd_at_full_rank_of_a_conv_layer_is_the_exact_weighted_sum():
    model = peftkit.get_peft_model(tiny_plain(), LoraConfig(r=2, target_modules=["conv"]))
    model.add_adapter("b", LoraConfig(r=3, target_modules=["conv"]))
    randomize_trainable(model)
    model.set_adapter("b")
    randomize_trainable(model, seed=4)
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type="svd", svd_rank=5)
    layer = model.base_model.model.conv
    expected = layer.delta_weight("default") + 0.5 * layer.delta_weight("b")
    torch.testing.assert_close(layer.delta_weight("mix"), expected, rtol=1e-4, atol=1e-6)


def test_svd_of_one_adapter_at_its_rank_reproduces_it():
    model = randomize_trainable(
        peftkit.get_peft_model(tiny_llama(), LoraConfig(r=3, target_modules=["k_proj"]))
    )
    model.add_weighted_adapter(["default", "default"], [0.5, 0.5], "same", combination_type="svd")
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    torch.testing.assert_close(
        layer.delta_weight("same"), layer.delta_weight("default"), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(adapters=["default", "nope"]), AdapterNameError, "no adapter named 'nope'"),
        (dict(weights=[1.0]), ConfigError, "'weights' has 1 entries but 'adapters' names 2"),
        (dict(combination_type="mean"), ConfigError, "combination_type must be one of svd|cat"),
        (dict(combination_type="ties"), ConfigError, "needs density in \\(0, 1\\], got None"),
        (
            dict(combination_type="dare_ties", density=1.5),
            ConfigError,
            "needs density in \\(0, 1\\], got 1.5",
        ),
        (dict(combination_type="linear"), ConfigError, "needs adapters of one rank"),
        (
            dict(majority_sign_method="median"),
            ConfigError,
            "majority_sign_method must be 'total' or 'frequency'",
        ),
        (dict(adapter_name="b"), AdapterNameError, "already has an adapter named 'b'"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error, message):
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    call = (
        dict(adapters=["default", "b"], weights=[1.0, 1.0], adapter_name="mix", combination_type="cat")
        | kwargs
    )
    with pytest.raises(error, match=message.replace("svd|cat", "cat")):
        model.add_weighted_adapter(**call)
    assert "mix" not in model.peft_config


def test_dora_adapters_cannot_be_combined():
    model = peftkit.get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="adapter 'default' uses DoRA"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
