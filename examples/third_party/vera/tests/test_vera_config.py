"""VeraConfig: PEFT's defaults, and a clear error for each bad value."""

from __future__ import annotations

import pytest
from peftkit import ConfigError
from peftkit_vera import VeraConfig


def test_defaults_are_peft_s():
    config = VeraConfig(target_modules=["q_proj"])
    assert (config.r, config.projection_prng_key, config.save_projection) == (256, 0, True)
    assert (config.vera_dropout, config.d_initial, config.init_weights) == (0.0, 0.1, True)
    assert config.peft_type == "VERA"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "VeraConfig.r must be an integer >= 1, got 0"),
        (dict(projection_prng_key=-1), "VeraConfig.projection_prng_key must be an integer >= 0, got -1"),
        (dict(vera_dropout=1.0), "VeraConfig.vera_dropout must be a number in [0, 1), got 1.0"),
        (dict(save_projection="yes"), "VeraConfig.save_projection must be True or False, got 'yes'"),
        (dict(d_initial="0.1"), "VeraConfig.d_initial must be a number, got '0.1'"),
        (dict(target_modules=None), "VeraConfig.target_modules must be a list of module names, a regex string"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ConfigError) as error:
        VeraConfig(**{"target_modules": ["q_proj"], **kwargs})
    assert message in str(error.value)


def test_peft_bias_other_than_none_is_refused():
    with pytest.raises(ConfigError, match=r"bias='all', a PEFT feature that peftkit's 'vera' method does not"):
        VeraConfig.from_dict({"peft_type": "VERA", "target_modules": ["q_proj"], "bias": "all"})
