"""PrefixTuningConfig has PEFT's fields and defaults, and rejects bad values at construction, naming the field."""

from __future__ import annotations

import dataclasses

import peft
import pytest
from peftkit import ConfigError
from peftkit_prefix_tuning import PrefixTuningConfig


def config(**kwargs):
    return PrefixTuningConfig(**({"task_type": "CAUSAL_LM", "num_virtual_tokens": 4} | kwargs))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_virtual_tokens=0), "PrefixTuningConfig.num_virtual_tokens must be an integer >= 1, got 0"),
        (
            dict(num_virtual_tokens=None),
            "PrefixTuningConfig.num_virtual_tokens must be an integer >= 1, got None",
        ),
        (
            dict(num_virtual_tokens=True),
            "PrefixTuningConfig.num_virtual_tokens must be an integer >= 1, got True",
        ),
        (dict(token_dim=0), "PrefixTuningConfig.token_dim must be an integer >= 1, got 0"),
        (dict(num_layers=-1), "PrefixTuningConfig.num_layers must be an integer >= 1, got -1"),
        (
            dict(num_attention_heads="4"),
            "PrefixTuningConfig.num_attention_heads must be an integer >= 1, got '4'",
        ),
        (
            dict(encoder_hidden_size=0.5),
            "PrefixTuningConfig.encoder_hidden_size must be an integer >= 1, got 0.5",
        ),
        (
            dict(token_dim=30, num_attention_heads=4),
            "PrefixTuningConfig.token_dim must be a multiple of num_attention_heads (4): each head gets an "
            "equal share, got 30",
        ),
        (
            dict(num_transformer_submodules=3),
            "PrefixTuningConfig.num_transformer_submodules must be None, 1 or 2, got 3",
        ),
        (
            dict(num_transformer_submodules=2),
            "PrefixTuningConfig.num_transformer_submodules must be None or 1 unless task_type is 'SEQ_2_SEQ_LM', got 2",
        ),
        (
            dict(prefix_projection="yes"),
            "PrefixTuningConfig.prefix_projection must be True or False, got 'yes'",
        ),
        (
            dict(init_weights="zeros"),
            "PrefixTuningConfig.init_weights must be None (random) or 'zero', got 'zeros'",
        ),
        (
            dict(task_type=None),
            "PrefixTuningConfig.task_type must be one of 'CAUSAL_LM', 'SEQ_CLS', 'SEQ_2_SEQ_LM'",
        ),
        (dict(task_type="GENERATE"), "PrefixTuningConfig.task_type must be None or one of"),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        config(**kwargs)
    assert message in str(info.value)


def test_fields_and_defaults_are_peft_s():
    theirs = {f.name: f.default for f in dataclasses.fields(peft.PrefixTuningConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(PrefixTuningConfig)}
    method_fields = [
        "num_virtual_tokens",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
        "init_weights",
        "encoder_hidden_size",
        "prefix_projection",
    ]
    for name in method_fields:
        assert ours[name] == theirs[name], name
    # every PEFT field is here (peft_version is PEFT's bookkeeping, read and ignored)
    assert set(theirs) - set(ours) == {"peft_version"}
    assert PrefixTuningConfig.method == "prefix_tuning"
    assert config(peft_type="LORA").peft_type == "PREFIX_TUNING"


def test_good_values_are_kept():
    made = config(
        task_type="SEQ_2_SEQ_LM",
        num_transformer_submodules=2,
        prefix_projection=True,
        encoder_hidden_size=64,
        init_weights="zero",
        token_dim=32,
        num_attention_heads=4,
    )
    assert (made.num_transformer_submodules, made.encoder_hidden_size, made.init_weights) == (2, 64, "zero")


def test_a_peft_config_dict_loads_and_saves_back_the_same_values():
    theirs = peft.PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=5, token_dim=32, num_layers=2, prefix_projection=True
    )
    data = theirs.to_dict()
    ours = PrefixTuningConfig.from_dict(data)
    assert ours.task_type == "SEQ_CLS" and ours.num_virtual_tokens == 5 and ours.prefix_projection is True
    mine = ours.to_dict()
    for key, value in data.items():
        if key != "peft_version":
            assert mine[key] == (value.value if hasattr(value, "value") else value), key
