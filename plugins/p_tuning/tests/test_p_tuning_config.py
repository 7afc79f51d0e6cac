"""PromptEncoderConfig has PEFT's fields and defaults, and rejects bad values at construction, naming the field."""

from __future__ import annotations

import dataclasses

import peft
import pytest
from peftkit import ConfigError
from peftkit_p_tuning import PromptEncoderConfig


def config(**kwargs):
    return PromptEncoderConfig(**({"task_type": "CAUSAL_LM", "num_virtual_tokens": 4} | kwargs))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_virtual_tokens=0), "PromptEncoderConfig.num_virtual_tokens must be an integer >= 1, got 0"),
        (
            dict(num_virtual_tokens=None),
            "PromptEncoderConfig.num_virtual_tokens must be an integer >= 1, got None",
        ),
        (dict(token_dim=0), "PromptEncoderConfig.token_dim must be an integer >= 1, got 0"),
        (dict(num_layers=-1), "PromptEncoderConfig.num_layers must be an integer >= 1, got -1"),
        (
            dict(num_attention_heads="4"),
            "PromptEncoderConfig.num_attention_heads must be an integer >= 1, got '4'",
        ),
        (
            dict(encoder_hidden_size=0),
            "PromptEncoderConfig.encoder_hidden_size must be an integer >= 1, got 0",
        ),
        (dict(encoder_num_layers=0), "PromptEncoderConfig.encoder_num_layers must be an integer >= 1, got 0"),
        (
            dict(encoder_dropout=1.0),
            "PromptEncoderConfig.encoder_dropout must be a number in [0, 1), got 1.0",
        ),
        (
            dict(encoder_dropout="0.1"),
            "PromptEncoderConfig.encoder_dropout must be a number in [0, 1), got '0.1'",
        ),
        (
            dict(encoder_reparameterization_type="GRU"),
            "PromptEncoderConfig.encoder_reparameterization_type must be one of 'MLP', 'LSTM', got 'GRU'",
        ),
        (
            dict(num_transformer_submodules=3),
            "PromptEncoderConfig.num_transformer_submodules must be None, 1 or 2, got 3",
        ),
        (
            dict(num_transformer_submodules=2),
            "PromptEncoderConfig.num_transformer_submodules must be None or 1 unless task_type is 'SEQ_2_SEQ_LM', got 2",
        ),
        (
            dict(task_type=None),
            "PromptEncoderConfig.task_type must be one of 'CAUSAL_LM', 'SEQ_CLS', 'SEQ_2_SEQ_LM'",
        ),
        (dict(task_type="GENERATE"), "PromptEncoderConfig.task_type must be None or one of"),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        config(**kwargs)
    assert message in str(info.value)


def test_fields_and_defaults_are_peft_s():
    theirs = {f.name: f.default for f in dataclasses.fields(peft.PromptEncoderConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(PromptEncoderConfig)}
    for name in (
        "num_virtual_tokens",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        "encoder_num_layers",
        "encoder_dropout",
    ):
        assert ours[name] == theirs[name], name
    assert set(theirs) - set(ours) == {"peft_version"}
    assert PromptEncoderConfig.method == "p_tuning"
    assert config(peft_type="LORA").peft_type == "P_TUNING"


def test_peft_s_enum_and_lstm_settings_are_accepted():
    made = config(
        encoder_reparameterization_type=peft.PromptEncoderReparameterizationType.LSTM,
        encoder_num_layers=3,
        encoder_dropout=0.1,
    )
    assert (made.encoder_reparameterization_type, made.encoder_num_layers, made.encoder_dropout) == (
        "LSTM",
        3,
        0.1,
    )


def test_encoder_num_layers_is_ignored_for_the_mlp_with_a_warning():
    with pytest.warns(
        UserWarning,
        match=r"PromptEncoderConfig.encoder_num_layers=3 is ignored for the MLP encoder \(as in PEFT\)",
    ):
        config(encoder_num_layers=3)


def test_a_peft_config_dict_loads_and_saves_back_the_same_values():
    theirs = peft.PromptEncoderConfig(
        task_type="SEQ_CLS", num_virtual_tokens=5, token_dim=32, encoder_reparameterization_type="LSTM"
    )
    data = theirs.to_dict()
    ours = PromptEncoderConfig.from_dict(data)
    assert ours.encoder_reparameterization_type == "LSTM" and ours.num_virtual_tokens == 5
    mine = ours.to_dict()
    for key, value in data.items():
        if key != "peft_version":
            assert mine[key] == (value.value if hasattr(value, "value") else value), key
