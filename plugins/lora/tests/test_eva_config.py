"""LoraConfig's EVA fields: PEFT's EvaConfig names and defaults, PEFT's rules, and errors that say what is right."""

from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
from peftkit import ConfigError
from peftkit_lora import EvaConfig, LoraConfig


def test_eva_config_has_peft_s_fields_and_defaults():
    ours = dataclasses.asdict(EvaConfig())
    theirs = {f.name: getattr(peft.EvaConfig(), f.name) for f in dataclasses.fields(peft.EvaConfig)}
    assert ours == theirs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": 0.5}, r"EvaConfig\.rho must be a number >= 1\.0 .*got 0\.5"),
        ({"tau": 1.5}, r"EvaConfig\.tau must be a cosine similarity in \[0, 1\], got 1\.5"),
        ({"tau": -0.1}, r"EvaConfig\.tau must be a cosine similarity in \[0, 1\], got -0\.1"),
        ({"whiten": "yes"}, r"EvaConfig\.whiten must be True or False, got 'yes'"),
        ({"label_mask_value": 1.5}, r"EvaConfig\.label_mask_value must be an integer label .*got 1\.5"),
    ],
)
def test_eva_config_fields_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EvaConfig(**kwargs)


def test_eva_without_an_eva_config_takes_the_defaults_with_a_warning_as_in_peft():
    with pytest.warns(
        UserWarning, match=r"init_lora_weights='eva' without an eva_config; using EvaConfig\(\)"
    ):
        config = LoraConfig(init_lora_weights="eva")
    assert config.eva_config == EvaConfig()


def test_an_eva_config_without_eva_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"eva_config is ignored unless init_lora_weights='eva'"):
        LoraConfig(eva_config=EvaConfig())


def test_a_dict_becomes_an_eva_config_and_unknown_keys_are_named():
    config = LoraConfig(init_lora_weights="eva", eva_config={"rho": 1.5})
    assert config.eva_config == EvaConfig(rho=1.5)
    with pytest.raises(ConfigError, match=r"LoraConfig\.eva_config must be an EvaConfig .*unknown: \['rh'\]"):
        LoraConfig(init_lora_weights="eva", eva_config={"rh": 1.5})
    with pytest.raises(ConfigError, match=r"LoraConfig\.eva_config must be an EvaConfig, a dict .* got 3"):
        LoraConfig(init_lora_weights="eva", eva_config=3)


def test_eva_on_parameters_is_refused_at_construction():
    with pytest.raises(
        ConfigError, match=r"init_lora_weights must be anything but 'eva' with target_parameters"
    ):
        LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(), target_parameters=["experts.down_proj"])


def test_the_init_error_lists_eva():
    with pytest.raises(ConfigError, match=r"'olora', 'loftq', 'eva' or 'corda', got 'evaa'"):
        LoraConfig(init_lora_weights="evaa")


def test_saved_as_the_dict_peft_writes_and_read_by_peft(tmp_path):
    config = LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=1.5, whiten=True))
    saved = config.to_dict()
    assert saved["eva_config"] == dataclasses.asdict(EvaConfig(rho=1.5, whiten=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a round trip raises no warning
        assert LoraConfig.from_dict(saved).eva_config == config.eva_config
    config.save_pretrained(tmp_path)
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert theirs.init_lora_weights == "eva"
    assert dataclasses.asdict(theirs.eva_config) == saved["eva_config"]
