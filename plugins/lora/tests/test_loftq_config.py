"""LoraConfig's LoftQ fields: PEFT's names, defaults, storage as a dict, and errors that say what is right."""

from __future__ import annotations

import warnings

import pytest
from peftkit import ConfigError
from peftkit_lora import LoftQConfig, LoraConfig


def test_loftq_needs_a_loftq_config():
    with pytest.raises(ConfigError, match=r"LoraConfig\.loftq_config must be a LoftQConfig .* got \{\}"):
        LoraConfig(init_lora_weights="loftq")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loftq_bits": 3}, r"LoftQConfig\.loftq_bits must be one of 4, 8, got 3"),
        ({"loftq_iter": 0}, r"LoftQConfig\.loftq_iter must be an integer >= 1, got 0"),
    ],
)
def test_loftq_config_fields_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoftQConfig(**kwargs)


def test_a_loftq_config_is_kept_as_the_dict_peft_writes():
    config = LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=2))
    assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}
    saved = config.to_dict()
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    assert LoraConfig.from_dict(saved).loftq_config == config.loftq_config


def test_a_dict_is_checked_like_a_loftq_config():
    assert LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}).loftq_config == {
        "loftq_bits": 8,
        "loftq_iter": 1,
    }
    with pytest.raises(ConfigError, match=r"LoftQConfig\.loftq_bits must be one of 4, 8, got 2"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2})
    with pytest.raises(ConfigError, match=r"loftq_config must be a LoftQConfig or a dict of loftq_bits"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})


def test_a_loftq_config_without_loftq_init_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="loftq_config is ignored unless init_lora_weights='loftq'"):
        LoraConfig(loftq_config=LoftQConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraConfig()  # the default {} says nothing


def test_peft_reads_the_same_fields():
    from peft import LoraConfig as PeftLoraConfig

    ours = LoraConfig(
        init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=3)
    ).to_dict()
    theirs = PeftLoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 3})
    assert theirs.loftq_config == ours["loftq_config"]
    assert theirs.init_lora_weights == ours["init_lora_weights"]


def test_loftq_without_bitsandbytes_says_what_to_install(monkeypatch):
    import sys

    import torch
    from peftkit_lora.init import loftq_factors

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(
        ImportError, match=r"init_lora_weights='loftq' quantizes with bitsandbytes.*pip install"
    ):
        loftq_factors(torch.randn(8, 64), r=2, scaling=1.0, bits=4, iterations=1)
