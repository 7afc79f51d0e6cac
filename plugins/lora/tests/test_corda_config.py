"""LoraConfig's CorDA fields: PEFT's CordaConfig names and defaults, PEFT's rules, errors that say what is right."""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
from peftkit import ConfigError
from peftkit_lora import CordaConfig, LoraConfig


def test_corda_config_has_peft_s_fields_and_defaults():
    theirs = peft.tuners.lora.config.CordaConfig()
    assert dataclasses.asdict(CordaConfig()) == {
        f.name: getattr(theirs, f.name) for f in dataclasses.fields(theirs)
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"corda_method": "top"}, r"CordaConfig\.corda_method must be one of 'ipm', 'kpm', got 'top'"),
        (
            {"cache_file": ""},
            r"CordaConfig\.cache_file must be None or a file path \(a non-empty string\), got ''",
        ),
        ({"covariance_file": 3}, r"CordaConfig\.covariance_file must be None or a file path .*got 3"),
        ({"verbose": 1}, r"CordaConfig\.verbose must be True or False, got 1"),
        (
            {"use_float16_for_covariance": "no"},
            r"CordaConfig\.use_float16_for_covariance must be True or False",
        ),
    ],
)
def test_corda_config_fields_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CordaConfig(**kwargs)


def test_corda_without_a_corda_config_takes_the_defaults_with_a_warning_as_in_peft():
    with pytest.warns(
        UserWarning, match=r"init_lora_weights='corda' without a corda_config; using CordaConfig\(\)"
    ):
        config = LoraConfig(init_lora_weights="corda")
    assert config.corda_config == CordaConfig()


def test_a_corda_config_without_corda_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"corda_config is ignored unless init_lora_weights='corda'"):
        LoraConfig(corda_config=CordaConfig())


def test_a_dict_becomes_a_corda_config_and_unknown_keys_are_named():
    config = LoraConfig(init_lora_weights="corda", corda_config={"corda_method": "kpm"})
    assert config.corda_config == CordaConfig(corda_method="kpm")
    with pytest.raises(
        ConfigError, match=r"LoraConfig\.corda_config must be a CordaConfig .*unknown: \['method'\]"
    ):
        LoraConfig(init_lora_weights="corda", corda_config={"method": "kpm"})
    with pytest.raises(
        ConfigError, match=r"LoraConfig\.corda_config must be a CordaConfig, a dict .* got 'kpm'"
    ):
        LoraConfig(init_lora_weights="corda", corda_config="kpm")


def test_corda_on_parameters_is_refused_at_construction():
    with pytest.raises(
        ConfigError, match=r"init_lora_weights must be anything but 'corda' with target_parameters"
    ):
        LoraConfig(
            init_lora_weights="corda", corda_config=CordaConfig(), target_parameters=["experts.down_proj"]
        )


def test_to_dict_writes_the_dict_peft_writes():
    config = LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))
    saved = config.to_dict()
    assert saved["corda_config"] == dataclasses.asdict(CordaConfig(corda_method="kpm"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a round trip raises no warning
        assert LoraConfig.from_dict(saved).corda_config == config.corda_config
    theirs = peft.LoraConfig(
        **{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(peft.LoraConfig)}}
    )
    assert dataclasses.asdict(theirs.corda_config) == saved["corda_config"]


def test_saved_as_plain_lora_for_the_residual_base(tmp_path):
    LoraConfig(init_lora_weights="corda", corda_config=CordaConfig()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["corda_config"] is None
    assert peft.LoraConfig.from_pretrained(tmp_path).init_lora_weights is True
