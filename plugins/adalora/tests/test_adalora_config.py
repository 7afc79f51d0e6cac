"""AdaLoraConfig rejects bad values at construction, naming the field and what is allowed."""

from __future__ import annotations

import dataclasses
import json

import peft
import peftkit
import pytest
from peftkit import ConfigError
from peftkit_adalora import AdaLoraConfig

OK = dict(total_step=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(total_step=None),
            "AdaLoraConfig.total_step must be the number of training steps, an integer >= 1",
        ),
        (dict(total_step=0), "AdaLoraConfig.total_step must be an integer >= 1, got 0"),
        (dict(init_r=0), "AdaLoraConfig.init_r must be an integer >= 1, got 0"),
        (dict(target_r=0), "AdaLoraConfig.target_r must be an integer >= 1, got 0"),
        (
            dict(init_r=4, target_r=6),
            "AdaLoraConfig.target_r must be at most init_r=4 (ranks only shrink), got 6",
        ),
        (
            dict(tinit=6, tfinal=4),
            "AdaLoraConfig.tinit must be less than total_step - tfinal = 10 - 4, so that the ranks have "
            "steps to shrink in",
        ),
        (dict(tinit=-1), "AdaLoraConfig.tinit must be an integer >= 0, got -1"),
        (dict(tfinal=1.5), "AdaLoraConfig.tfinal must be an integer >= 0, got 1.5"),
        (dict(deltaT=0), "AdaLoraConfig.deltaT must be an integer >= 1, got 0"),
        (dict(beta1=1.0), "AdaLoraConfig.beta1 must be a number in (0, 1), got 1.0"),
        (dict(beta2=0), "AdaLoraConfig.beta2 must be a number in (0, 1), got 0"),
        (dict(beta2=-0.5), "AdaLoraConfig.beta2 must be a number in (0, 1), got -0.5"),
        (dict(orth_reg_weight=-0.1), "AdaLoraConfig.orth_reg_weight must be a number >= 0, got -0.1"),
        (dict(lora_alpha=0), "AdaLoraConfig.lora_alpha must be a positive number, got 0"),
        (dict(lora_dropout=1.0), "AdaLoraConfig.lora_dropout must be a number in [0, 1), got 1.0"),
        (dict(bias="some"), "AdaLoraConfig.bias must be one of 'none', 'all', 'lora_only', got 'some'"),
        (dict(init_lora_weights="gaussian"), "AdaLoraConfig.init_lora_weights must be True or False"),
        (
            dict(target_modules=3),
            "AdaLoraConfig.target_modules must be a list of module names, a regex string",
        ),
        (
            dict(target_modules=".*q", layers_to_transform=[0]),
            "AdaLoraConfig.layers_to_transform must be None when target_modules is a regex string",
        ),
        (
            dict(layers_pattern="layers"),
            "AdaLoraConfig.layers_pattern must be None unless layers_to_transform",
        ),
        (
            dict(init_r=2, target_r=1, rank_pattern={"q.lora_E": [True]}),
            "AdaLoraConfig.rank_pattern must be None or a dict of '<module path>.lora_E' to a list of "
            "init_r=2 booleans",
        ),
        (dict(task_type="CLASSIFY"), "AdaLoraConfig.task_type must be None or one of"),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        AdaLoraConfig(**{**OK, **kwargs})
    assert message in str(info.value)


def test_defaults_are_peft_defaults():
    ours = AdaLoraConfig(total_step=10).to_dict()
    theirs = peft.AdaLoraConfig(total_step=10).to_dict()
    for name, value in ours.items():
        if name in ("peft_type", "target_modules", "exclude_modules"):
            continue
        assert theirs[name] == value, name
    assert ours["peft_type"] == "ADALORA"
    # every PEFT field is a field here or a declared PEFT-only field
    assert set(theirs) - {"peft_version"} <= set(ours) | set(AdaLoraConfig.peft_only_fields)
    for name, default in AdaLoraConfig.peft_only_fields.items():
        if name in theirs:
            assert theirs[name] == default or name == "runtime_config", name


def test_r_is_ignored_with_a_warning_as_in_peft():
    with pytest.warns(UserWarning, match="AdaLoraConfig.r=16 is ignored"):
        AdaLoraConfig(total_step=10, r=16)


def test_a_peft_config_with_an_unimplemented_feature_is_refused(tmp_path):
    data = json.loads(json.dumps(peft.AdaLoraConfig(total_step=10).to_dict(), default=str))
    assert AdaLoraConfig.from_dict({**data}).total_step == 10
    with pytest.raises(ConfigError, match="use_rslora=True, a PEFT feature that peftkit's 'adalora' method"):
        AdaLoraConfig.from_dict({**data, "use_rslora": True})


def test_config_is_reexported_and_round_trips(tmp_path):
    assert peftkit.AdaLoraConfig is AdaLoraConfig
    config = AdaLoraConfig(total_step=10, init_r=2, target_r=1, rank_pattern={"a.lora_E": [True, False]})
    config.save_pretrained(tmp_path)
    loaded = peftkit.load_config(tmp_path)
    assert dataclasses.replace(loaded, inference_mode=False) == config
