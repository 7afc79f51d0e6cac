"""IA3Config rejects bad values at construction, and injection fills PEFT's per-architecture defaults."""

from __future__ import annotations

import peft
import peftkit
import pytest
from peftkit import ConfigError, TargetModulesError
from peftkit.testing.models import tiny_bert, tiny_llama, tiny_plain, tiny_t5
from peftkit_ia3 import IA3Config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"]),
            "IA3Config.feedforward_modules must be a subset of target_modules ['k_proj', 'v_proj'] "
            "(not targets: ['down_proj']), got ['down_proj']",
        ),
        (
            dict(target_modules=["wo"], feedforward_modules=["wo", "wi"]),
            "IA3Config.feedforward_modules must be a subset of target_modules ['wo'] (not targets: ['wi'])",
        ),
        (
            dict(target_modules=3),
            "IA3Config.target_modules must be a list of module names, a regex string or None, got 3",
        ),
        (
            dict(feedforward_modules=[1]),
            "IA3Config.feedforward_modules must be a list of module names, a regex string or None, got [1]",
        ),
        (
            dict(exclude_modules={"a": 1}),
            "IA3Config.exclude_modules must be a list of module names, a regex string or None",
        ),
        (dict(fan_in_fan_out="yes"), "IA3Config.fan_in_fan_out must be True or False, got 'yes'"),
        (dict(init_ia3_weights=1), "IA3Config.init_ia3_weights must be True or False, got 1"),
        (dict(task_type="CLASSIFY"), "IA3Config.task_type must be None or one of"),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        IA3Config(**kwargs)
    assert message in str(info.value)


def test_feedforward_not_among_targets_is_refused_as_peft_refuses_it():
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_a_regex_on_either_side_is_not_compared_as_in_peft():
    IA3Config(target_modules=r".*(k_proj|down_proj)", feedforward_modules=["down_proj"])
    IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=r".*down_proj")
    IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"])


def test_sets_are_kept_as_sorted_lists_and_defaults_are_peft_defaults():
    config = IA3Config(target_modules={"v", "k", "wo"}, feedforward_modules={"wo"}, task_type="SEQ_2_SEQ_LM")
    assert config.target_modules == ["k", "v", "wo"] and config.feedforward_modules == ["wo"]
    ours = IA3Config().to_dict()
    theirs = peft.IA3Config().to_dict()
    del theirs["peft_version"]
    assert ours == theirs


def test_a_peft_config_dict_loads_and_unknown_keys_warn():
    saved = peft.IA3Config(target_modules=["k", "wo"], feedforward_modules=["wo"]).to_dict()
    config = IA3Config.from_dict(saved)
    assert config.target_modules == ["k", "wo"] and config.feedforward_modules == ["wo"]
    with pytest.warns(UserWarning, match=r"IA3Config ignores unknown config keys \['layers_to_transform'\]"):
        IA3Config.from_dict({**saved, "layers_to_transform": [0]})


def layout(model) -> dict[str, str]:
    """Each adapted module's last path components and what its vector scales."""
    return {
        ".".join(path.split(".")[-2:]): "input" if layer.is_feedforward["default"] else "output"
        for path, layer in model.adapter_layers()
        if hasattr(layer, "is_feedforward")
    }


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (tiny_llama, {"self_attn.k_proj": "output", "self_attn.v_proj": "output", "mlp.down_proj": "input"}),
        (
            tiny_bert,
            {
                "self.key": "output",
                "self.value": "output",
                "output.dense": "input",  # both the attention output and the MLP output, as in PEFT
            },
        ),
        (
            tiny_t5,
            {
                "SelfAttention.k": "output",
                "SelfAttention.v": "output",
                "EncDecAttention.k": "output",
                "EncDecAttention.v": "output",
                "DenseReluDense.wo": "input",
            },
        ),
    ],
)
def test_defaults_per_architecture_match_peft(build, expected):
    ours = peftkit.get_peft_model(build(), IA3Config())
    theirs = peft.get_peft_model(build(), peft.IA3Config())
    assert layout(ours) == expected
    their_paths = {
        name.removesuffix(".ia3_l.default") for name, _ in theirs.named_parameters() if ".ia3_l." in name
    }
    our_paths = {f"base_model.model.{path}" for path, _ in ours.adapter_layers() if hasattr(_, "ia3_l")}
    assert our_paths == their_paths
    saved = ours.peft_config["default"]
    assert sorted(saved.target_modules) == sorted(theirs.peft_config["default"].target_modules)
    assert sorted(saved.feedforward_modules) == sorted(theirs.peft_config["default"].feedforward_modules)


def test_feedforward_default_applies_even_when_targets_are_given_as_in_peft():
    ours = peftkit.get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj", "down_proj"]))
    assert ours.peft_config["default"].feedforward_modules == ["down_proj"]
    assert set(layout(ours).values()) == {"input", "output"}


def test_an_unknown_architecture_needs_targets_and_feedforward_modules():
    with pytest.raises(TargetModulesError) as info:
        peftkit.get_peft_model(tiny_plain(), IA3Config())
    assert "IA3Config.target_modules is None and peftkit-ia3 has no default for model_type None" in str(
        info.value
    )
    with pytest.raises(ConfigError) as info:
        peftkit.get_peft_model(tiny_plain(), IA3Config(target_modules=["fc1", "fc2"]))
    assert "IA3Config.feedforward_modules is None and peftkit-ia3 has no default for model_type None" in str(
        info.value
    )
    assert "or pass [] to scale every target's output" in str(info.value)
    model = peftkit.get_peft_model(
        tiny_plain(), IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=[])
    )
    assert set(layout(model).values()) == {"output"}


def test_fan_in_fan_out_is_recorded_for_gpt2_conv1d_as_peft_records_it():
    from peftkit.testing.models import tiny_gpt2

    model = peftkit.get_peft_model(tiny_gpt2(), IA3Config())
    assert model.peft_config["default"].fan_in_fan_out is True
    assert peftkit.get_peft_model(tiny_llama(), IA3Config()).peft_config["default"].fan_in_fan_out is False
