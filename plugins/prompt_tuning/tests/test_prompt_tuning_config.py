"""PromptTuningConfig has PEFT's fields and defaults, and rejects bad values at construction, naming the field."""

from __future__ import annotations

import dataclasses

import peft
import pytest
from peftkit import ConfigError
from peftkit_prompt_tuning import PromptTuningConfig

TEXT = dict(
    prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify:", tokenizer_name_or_path="some/tokenizer"
)


def config(**kwargs):
    return PromptTuningConfig(**({"task_type": "CAUSAL_LM", "num_virtual_tokens": 4} | kwargs))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_virtual_tokens=0), "PromptTuningConfig.num_virtual_tokens must be an integer >= 1, got 0"),
        (
            dict(num_virtual_tokens=None),
            "PromptTuningConfig.num_virtual_tokens must be an integer >= 1, got None",
        ),
        (
            dict(num_virtual_tokens=2.0),
            "PromptTuningConfig.num_virtual_tokens must be an integer >= 1, got 2.0",
        ),
        (dict(token_dim=0), "PromptTuningConfig.token_dim must be an integer >= 1, got 0"),
        (dict(num_layers=-1), "PromptTuningConfig.num_layers must be an integer >= 1, got -1"),
        (
            dict(num_attention_heads="4"),
            "PromptTuningConfig.num_attention_heads must be an integer >= 1, got '4'",
        ),
        (
            dict(num_transformer_submodules=3),
            "PromptTuningConfig.num_transformer_submodules must be None, 1 or 2, got 3",
        ),
        (
            dict(num_transformer_submodules=2),
            "PromptTuningConfig.num_transformer_submodules must be None or 1 unless task_type is 'SEQ_2_SEQ_LM', got 2",
        ),
        (
            dict(task_type=None),
            "PromptTuningConfig.task_type must be one of 'CAUSAL_LM', 'SEQ_CLS', 'SEQ_2_SEQ_LM'",
        ),
        (dict(task_type="GENERATE"), "PromptTuningConfig.task_type must be None or one of"),
        (
            dict(prompt_tuning_init="SAMPLE"),
            "PromptTuningConfig.prompt_tuning_init must be one of 'RANDOM', 'TEXT', 'SAMPLE_VOCAB', got 'SAMPLE'",
        ),
        (
            TEXT | dict(tokenizer_name_or_path=None),
            "PromptTuningConfig.tokenizer_name_or_path must be a tokenizer name or folder when "
            "prompt_tuning_init='TEXT', got None",
        ),
        (
            TEXT | dict(tokenizer_name_or_path=""),
            "PromptTuningConfig.tokenizer_name_or_path must be a tokenizer name or folder when "
            "prompt_tuning_init='TEXT', got ''",
        ),
        (
            TEXT | dict(prompt_tuning_init_text=None),
            "PromptTuningConfig.prompt_tuning_init_text must be a string when prompt_tuning_init='TEXT', got None",
        ),
        (
            dict(tokenizer_kwargs={"use_fast": False}),
            "PromptTuningConfig.tokenizer_kwargs must be None unless prompt_tuning_init='TEXT', got {'use_fast': False}",
        ),
        (
            TEXT | dict(tokenizer_kwargs=["use_fast"]),
            "PromptTuningConfig.tokenizer_kwargs must be None or a dict of AutoTokenizer.from_pretrained arguments",
        ),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        config(**kwargs)
    assert message in str(info.value)


def test_fields_and_defaults_are_peft_s():
    theirs = {f.name: f.default for f in dataclasses.fields(peft.PromptTuningConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(PromptTuningConfig)}
    method_fields = [
        "num_virtual_tokens",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs",
    ]
    for name in method_fields:
        assert ours[name] == theirs[name], name
    assert PromptTuningConfig.method == "prompt_tuning"
    assert config().peft_type == "PROMPT_TUNING"


def test_text_init_settings_and_peft_s_enum_are_accepted():
    made = config(**TEXT, tokenizer_kwargs={"use_fast": True})
    assert made.tokenizer_kwargs == {"use_fast": True}
    assert config(prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB).prompt_tuning_init == "SAMPLE_VOCAB"
    assert config(task_type="SEQ_2_SEQ_LM", num_transformer_submodules=2).num_transformer_submodules == 2


def test_a_peft_config_dict_loads_and_saves_back_the_same_values():
    theirs = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5, token_dim=32, num_layers=2)
    data = theirs.to_dict()
    ours = PromptTuningConfig.from_dict(data)
    assert ours.task_type == "SEQ_CLS" and ours.num_virtual_tokens == 5 and ours.token_dim == 32
    mine = ours.to_dict()
    for key, value in data.items():
        if key != "peft_version":
            assert mine[key] == (value.value if hasattr(value, "value") else value), key
