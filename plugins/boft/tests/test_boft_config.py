"""BOFTConfig validates at construction, with messages that name the field, the value and what is allowed;
checks that need a layer's size fail at injection, naming the layer."""

from __future__ import annotations

import re

import peftkit
import pytest
from peftkit import ConfigError
from peftkit.testing.models import tiny_llama
from peftkit_boft import BOFTConfig
from peftkit_boft.config import largest_factor_for


def test_defaults_size_blocks_by_boft_block_size():
    config = BOFTConfig()
    assert (config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor) == (4, 0, 1)
    assert config.peft_type == "BOFT"


def test_block_num_alone_is_accepted_with_block_size_zero():
    assert BOFTConfig(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=4).boft_block_num == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(boft_block_num=4),
            "BOFTConfig.boft_block_num must be 0 when boft_block_size is non-zero (4): give exactly one of them, "
            "as boft_block_size x boft_block_num = in_features (e.g. boft_block_size=0, boft_block_num=4), got 4",
        ),
        (
            dict(boft_block_size=0),
            "BOFTConfig.boft_block_size must be non-zero when boft_block_num is 0 (give exactly one of "
            "boft_block_size, the size of a block, and boft_block_num, the number of blocks), got 0",
        ),
        (
            dict(boft_block_size=0, boft_block_num=12, boft_n_butterfly_factor=4),
            "BOFTConfig.boft_n_butterfly_factor must be at most 3 with boft_block_num=12: each factor after the "
            "first pairs up blocks, so 2**(boft_n_butterfly_factor - 1) must divide boft_block_num, got 4",
        ),
        (
            dict(boft_block_size=0, boft_block_num=3, boft_n_butterfly_factor=2),
            "BOFTConfig.boft_n_butterfly_factor must be at most 1 with boft_block_num=3",
        ),
        (
            dict(boft_block_size=3, boft_n_butterfly_factor=2),
            "BOFTConfig.boft_block_size must be an even number when boft_n_butterfly_factor > 1 (2): the "
            "butterfly permutations move half blocks, got 3",
        ),
        (dict(boft_n_butterfly_factor=0), "BOFTConfig.boft_n_butterfly_factor must be an integer >= 1, got 0"),
        (dict(boft_block_size=-4), "BOFTConfig.boft_block_size must be an integer >= 0, got -4"),
        (dict(boft_block_size=0, boft_block_num=2.0), "BOFTConfig.boft_block_num must be an integer >= 0, got 2.0"),
        (dict(boft_dropout=1.0), "BOFTConfig.boft_dropout must be a number in [0, 1), got 1.0"),
        (dict(bias="oft_only"), "BOFTConfig.bias must be one of 'none', 'all', 'boft_only', got 'oft_only'"),
        (dict(init_weights="gaussian"), "BOFTConfig.init_weights must be True or False, got 'gaussian'"),
        (dict(fan_in_fan_out=1), "BOFTConfig.fan_in_fan_out must be True or False, got 1"),
        (
            dict(target_modules=3),
            "BOFTConfig.target_modules must be a list of module names, a regex string or None",
        ),
        (
            dict(layers_pattern="layers"),
            "BOFTConfig.layers_pattern must be None unless layers_to_transform is set",
        ),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        BOFTConfig(**kwargs)


@pytest.mark.parametrize(("blocks", "largest"), [(1, 1), (2, 2), (3, 1), (8, 4), (12, 3), (40, 4)])
def test_largest_factor_is_one_plus_the_powers_of_two_in_the_block_count(blocks, largest):
    assert largest_factor_for(blocks) == largest
    BOFTConfig(boft_block_size=0, boft_block_num=blocks, boft_n_butterfly_factor=largest)
    with pytest.raises(ConfigError):
        BOFTConfig(boft_block_size=0, boft_block_num=blocks, boft_n_butterfly_factor=largest + 1)


# tiny_llama: hidden size 32, so q_proj has 32 input features
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(boft_block_size=5),
            "BOFTConfig.boft_block_size=5 must divide the 32 input features of 'model.layers.0.self_attn.q_proj': "
            "try one of [2, 4, 8]",
        ),
        (
            dict(boft_block_size=0, boft_block_num=6),
            "BOFTConfig.boft_block_num=6 must divide the 32 input features of 'model.layers.0.self_attn.q_proj': "
            "try one of [2, 4, 8]",
        ),
        (
            dict(boft_block_size=8, boft_n_butterfly_factor=4),
            "BOFTConfig.boft_n_butterfly_factor=4 with boft_block_size=8 needs boft_block_size x "
            "2**(boft_n_butterfly_factor - 1) = 64 to divide the 32 input features of "
            "'model.layers.0.self_attn.q_proj': use boft_n_butterfly_factor <= 3 or another boft_block_size",
        ),
        (
            dict(boft_block_size=0, boft_block_num=32, boft_n_butterfly_factor=2),
            "BOFTConfig.boft_block_num=32 cuts the 32 input features of 'model.layers.0.self_attn.q_proj' into "
            "blocks of 1, an odd size, but boft_n_butterfly_factor=2 needs even blocks",
        ),
    ],
)
def test_a_layout_that_does_not_fit_a_layer_fails_at_injection_naming_the_layer(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        peftkit.get_peft_model(tiny_llama(), BOFTConfig(target_modules=["q_proj"], **kwargs))


def test_saved_config_round_trips():
    config = BOFTConfig(
        boft_block_size=0,
        boft_block_num=8,
        boft_n_butterfly_factor=3,
        boft_dropout=0.1,
        bias="boft_only",
        target_modules=["q_proj"],
    )
    assert BOFTConfig.from_dict(config.to_dict()) == config
