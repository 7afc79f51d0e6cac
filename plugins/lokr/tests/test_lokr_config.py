"""LoKrConfig rejects bad values at construction, naming the field and what is allowed; it has PEFT's fields."""

from __future__ import annotations

import dataclasses

import peft
import pytest
from peftkit import ConfigError
from peftkit_lokr import LoKrConfig

FACTOR = "-1 (split each size near its square root) or an integer >= 1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "LoKrConfig.r must be an integer >= 1, got 0"),
        (dict(r=-3), "LoKrConfig.r must be an integer >= 1, got -3"),
        (dict(r=2.5), "LoKrConfig.r must be an integer >= 1, got 2.5"),
        (dict(alpha=0), "LoKrConfig.alpha must be a positive number, got 0"),
        (dict(alpha="8"), "LoKrConfig.alpha must be a positive number, got '8'"),
        (dict(rank_dropout=1.0), "LoKrConfig.rank_dropout must be a number in [0, 1), got 1.0"),
        (dict(rank_dropout=-0.1), "LoKrConfig.rank_dropout must be a number in [0, 1), got -0.1"),
        (dict(module_dropout=1.5), "LoKrConfig.module_dropout must be a number in [0, 1), got 1.5"),
        (dict(decompose_factor=0), f"LoKrConfig.decompose_factor must be {FACTOR}, got 0"),
        (dict(decompose_factor=-2), f"LoKrConfig.decompose_factor must be {FACTOR}, got -2"),
        (dict(decompose_factor=2.0), f"LoKrConfig.decompose_factor must be {FACTOR}, got 2.0"),
        (dict(decompose_both="yes"), "LoKrConfig.decompose_both must be True or False, got 'yes'"),
        (dict(use_effective_conv2d=1), "LoKrConfig.use_effective_conv2d must be True or False, got 1"),
        (dict(rank_dropout_scale=None), "LoKrConfig.rank_dropout_scale must be True or False, got None"),
        (
            dict(init_weights="gaussian"),
            "LoKrConfig.init_weights must be True, False or 'lycoris', got 'gaussian'",
        ),
        (dict(init_weights=1), "LoKrConfig.init_weights must be True, False or 'lycoris', got 1"),
        (
            dict(target_modules=3),
            "LoKrConfig.target_modules must be a list of module names, a regex string or None, got 3",
        ),
        (
            dict(exclude_modules=[1]),
            "LoKrConfig.exclude_modules must be a list of module names, a regex string or None, got [1]",
        ),
        (dict(task_type="CLASSIFY"), "LoKrConfig.task_type must be None or one of"),
        (
            dict(rank_pattern={"q": 0}),
            "LoKrConfig.rank_pattern must be a dict of module regex to positive integer rank, got {'q': 0}",
        ),
        (
            dict(rank_pattern=["q"]),
            "LoKrConfig.rank_pattern must be a dict of module regex to positive integer rank, got ['q']",
        ),
        (
            dict(alpha_pattern={"q": -1}),
            "LoKrConfig.alpha_pattern must be a dict of module regex to positive alpha, got {'q': -1}",
        ),
        (
            dict(target_modules=".*q", layers_to_transform=[0]),
            "LoKrConfig.layers_to_transform must be None when target_modules is a regex string",
        ),
        (
            dict(layers_pattern="layers"),
            "LoKrConfig.layers_pattern must be None unless layers_to_transform is set",
        ),
        (
            dict(layers_to_transform=[-1]),
            "LoKrConfig.layers_to_transform must be None, a layer index or a list of layer indices, got [-1]",
        ),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        LoKrConfig(**kwargs)
    assert message in str(info.value)


def test_fields_and_defaults_are_peft_s():
    ours = {f.name: getattr(LoKrConfig(), f.name) for f in dataclasses.fields(LoKrConfig)}
    theirs = peft.LoKrConfig().to_dict()
    theirs.pop("peft_version")  # bookkeeping PEFT writes; the core skips it on load
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        if name == "peft_type":
            assert ours[name] == "LOKR" == value.value
        else:
            assert ours[name] == value, name


def test_a_saved_peft_config_loads_with_every_value():
    saved = peft.LoKrConfig(
        r=4,
        alpha=16,
        rank_dropout=0.1,
        module_dropout=0.2,
        use_effective_conv2d=True,
        decompose_both=True,
        decompose_factor=8,
        rank_dropout_scale=True,
        init_weights="lycoris",
        target_modules=["q_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"q_proj": 4},
    ).to_dict()
    config = LoKrConfig.from_dict(saved)
    assert (config.r, config.alpha, config.decompose_factor, config.init_weights) == (4, 16, 8, "lycoris")
    assert (config.rank_dropout, config.module_dropout) == (0.1, 0.2)
    assert config.use_effective_conv2d and config.decompose_both and config.rank_dropout_scale
    assert config.target_modules == ["q_proj"] and config.rank_pattern == {"q_proj": 2}


def test_none_patterns_mean_no_per_module_values():
    config = LoKrConfig(rank_pattern=None, alpha_pattern=None)
    assert config.rank_pattern == {} and config.alpha_pattern == {}
