"""BitFitConfig: defaults, and bad values fail at construction naming the class, field, value and what is allowed."""

from __future__ import annotations

import pytest
from peftkit import ConfigError
from peftkit_bitfit import BitFitConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(target_modules=3),
            "BitFitConfig.target_modules must be a list of module names, a regex string or None, got 3",
        ),
        (
            dict(exclude_modules=[1]),
            "BitFitConfig.exclude_modules must be a list of module names, a regex string or None, got [1]",
        ),
        (dict(train_layer_norm="yes"), "BitFitConfig.train_layer_norm must be True or False, got 'yes'"),
        (dict(train_layer_norm=1), "BitFitConfig.train_layer_norm must be True or False, got 1"),
        (
            dict(layers_to_transform=[-1]),
            "BitFitConfig.layers_to_transform must be None, a layer index or a list of layer indices, got [-1]",
        ),
        (
            dict(layers_to_transform=[True]),
            "BitFitConfig.layers_to_transform must be None, a layer index or a list of layer indices",
        ),
        (
            dict(target_modules=".*dense", layers_to_transform=0),
            "BitFitConfig.layers_to_transform must be None when target_modules is a string, got 0",
        ),
        (
            dict(layers_pattern="layer"),
            "BitFitConfig.layers_pattern must be None unless layers_to_transform is set, got 'layer'",
        ),
        (dict(task_type="CLASSIFY"), "BitFitConfig.task_type must be None or one of"),
        (dict(modules_to_save="classifier"), "BitFitConfig.modules_to_save must be a list of module names"),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        BitFitConfig(**kwargs)
    assert message in str(info.value)


def test_defaults_and_dict_round_trip():
    config = BitFitConfig()
    assert (config.peft_type, config.target_modules, config.train_layer_norm) == ("BITFIT", None, False)
    assert config.method == "bitfit"
    config = BitFitConfig(
        target_modules={"value", "query"}, train_layer_norm=True, layers_to_transform=1, task_type="SEQ_CLS"
    )
    assert config.target_modules == ["query", "value"]
    data = config.to_dict()
    assert data["task_type"] == "SEQ_CLS" and data["train_layer_norm"] is True
    assert BitFitConfig.from_dict(data) == config
