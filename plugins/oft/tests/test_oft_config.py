"""OFTConfig validates at construction, with messages that name the field, the value and what is allowed."""

from __future__ import annotations

import re

import pytest
from peftkit import ConfigError
from peftkit_oft import OFTConfig


def test_defaults_size_blocks_by_oft_block_size():
    config = OFTConfig()
    assert (config.r, config.oft_block_size, config.peft_type) == (0, 32, "OFT")


def test_r_alone_is_accepted_with_oft_block_size_zero():
    assert OFTConfig(r=4, oft_block_size=0).r == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(r=4),
            "OFTConfig.r must be 0 when oft_block_size is non-zero (32): give exactly one of r and oft_block_size",
        ),
        (dict(r=0, oft_block_size=0), "OFTConfig.oft_block_size must be non-zero when r is 0"),
        (dict(r=-1, oft_block_size=0), "OFTConfig.r must be an integer >= 0, got -1"),
        (dict(oft_block_size=2.5), "OFTConfig.oft_block_size must be an integer >= 0, got 2.5"),
        (dict(bias="lora_only"), "OFTConfig.bias must be one of 'none', 'all', 'oft_only', got 'lora_only'"),
        (dict(module_dropout=1.5), "OFTConfig.module_dropout must be a number in [0, 1), got 1.5"),
        (dict(eps=0), "OFTConfig.eps must be a number > 0"),
        (dict(coft="yes"), "OFTConfig.coft must be True or False, got 'yes'"),
        (dict(block_share=1), "OFTConfig.block_share must be True or False, got 1"),
        (dict(use_cayley_neumann=None), "OFTConfig.use_cayley_neumann must be True or False, got None"),
        (
            dict(num_cayley_neumann_terms=0),
            "OFTConfig.num_cayley_neumann_terms must be an integer >= 1, got 0",
        ),
        (
            dict(target_modules=3),
            "OFTConfig.target_modules must be a list of module names, a regex string or None",
        ),
        (
            dict(layers_pattern="layers"),
            "OFTConfig.layers_pattern must be None unless layers_to_transform is set",
        ),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        OFTConfig(**kwargs)


def test_saved_config_round_trips_and_says_which_peft_format_it_is():
    config = OFTConfig(
        r=4, oft_block_size=0, coft=True, eps=1e-3, block_share=True, target_modules=["q_proj"]
    )
    saved = config.to_dict()
    assert (
        saved["peft_version"] == "0.21.0"
    )  # PEFT reads the current Cayley-Neumann series, without a warning
    assert OFTConfig.from_dict(saved) == config
