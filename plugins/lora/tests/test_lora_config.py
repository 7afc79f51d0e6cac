"""LoraConfig rejects bad values at construction, naming the field and what is allowed."""

from __future__ import annotations

import pytest
from peftkit import ConfigError
from peftkit_lora import LoraConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "LoraConfig.r must be an integer >= 1, got 0"),
        (dict(r=2.5), "LoraConfig.r must be an integer >= 1, got 2.5"),
        (dict(lora_alpha=0), "LoraConfig.lora_alpha must be a positive number, got 0"),
        (dict(lora_dropout=1.0), "LoraConfig.lora_dropout must be a number in [0, 1), got 1.0"),
        (dict(bias="some"), "LoraConfig.bias must be one of 'none', 'all', 'lora_only', got 'some'"),
        (
            dict(init_lora_weights="lora_ga"),
            "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<N>' "
            "(N >= 1 iterations), 'olora', 'loftq', 'eva' or 'corda', got 'lora_ga'",
        ),
        (
            dict(target_modules=3),
            "LoraConfig.target_modules must be a list of module names, a regex string or None",
        ),
        (dict(task_type="CLASSIFY"), "LoraConfig.task_type must be None or one of"),
        (
            dict(rank_pattern={"q": 0}),
            "LoraConfig.rank_pattern must be a dict of module regex to positive integer rank",
        ),
        (
            dict(alpha_pattern={"q": -1}),
            "LoraConfig.alpha_pattern must be a dict of module regex to positive alpha",
        ),
        (
            dict(target_modules=".*q", layers_to_transform=[0]),
            "LoraConfig.layers_to_transform must be None when target_modules is a regex string",
        ),
        (
            dict(layers_pattern="layers"),
            "LoraConfig.layers_pattern must be None unless layers_to_transform is set",
        ),
        (
            dict(layers_to_transform=[-1]),
            "LoraConfig.layers_to_transform must be None, a layer index or a list",
        ),
        (dict(use_rslora="yes"), "LoraConfig.use_rslora must be True or False, got 'yes'"),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    assert message in str(info.value)


def test_sets_of_names_are_kept_as_sorted_lists_and_task_types_as_enums():
    config = LoraConfig(target_modules={"v_proj", "q_proj"}, task_type="CAUSAL_LM")
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.to_dict()["task_type"] == "CAUSAL_LM"


def test_lora_bias_is_not_implemented_and_fails_clearly():
    message = "LoraConfig.lora_bias must be False: peftkit-lora does not implement lora_bias, got True"
    with pytest.raises(ConfigError, match=message):
        LoraConfig(lora_bias=True)
    with pytest.raises(ConfigError, match=message):
        LoraConfig.from_dict(LoraConfig(r=4).to_dict() | {"lora_bias": True})


def test_use_dora_must_be_a_bool():
    with pytest.raises(ConfigError, match="LoraConfig.use_dora must be True or False, got 'yes'"):
        LoraConfig(use_dora="yes")


def test_other_peft_features_fail_clearly_when_a_saved_config_uses_them():
    data = LoraConfig(r=4).to_dict() | {"use_qalora": True, "peft_version": "0.21.2"}
    with pytest.raises(
        ConfigError, match=r"the adapter sets use_qalora=True, a PEFT feature that peftkit's 'lora'"
    ):
        LoraConfig.from_dict(data)


def test_peft_only_fields_at_their_defaults_load_silently(recwarn):
    data = LoraConfig(r=4).to_dict() | {
        "use_dora": False,
        "eva_config": None,
        "megatron_core": "megatron.core",
    }
    assert LoraConfig.from_dict(data).r == 4
    assert not [w for w in recwarn if "ignores" in str(w.message)]


def test_unknown_keys_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"LoraConfig ignores unknown config keys \['brand_new_field'\]"):
        LoraConfig.from_dict(LoraConfig(r=4).to_dict() | {"brand_new_field": 1})
