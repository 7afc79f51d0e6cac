"""BottleneckConfig: AdapterHub's per-style defaults, and bad values refused at construction."""

from __future__ import annotations

import pytest
from peftkit import ConfigError
from peftkit_bottleneck import BottleneckConfig


# AdapterHub's presets: DoubleSeqBnConfig (Houlsby), SeqBnConfig (Pfeiffer), ParBnConfig (He et al.)
@pytest.mark.parametrize(
    ("style", "reduction_factor", "non_linearity", "scaling"),
    [("houlsby", 16, "swish", 1.0), ("pfeiffer", 16, "relu", 1.0), ("parallel", 2, "relu", 4.0)],
)
def test_style_defaults_are_adapterhubs(style, reduction_factor, non_linearity, scaling):
    config = BottleneckConfig(style=style)
    assert (config.reduction_factor, config.non_linearity, config.scaling) == (
        reduction_factor,
        non_linearity,
        scaling,
    )
    assert config.init_weights == "mam_adapter" and config.peft_type == "BOTTLENECK"


def test_defaults_and_explicit_values():
    config = BottleneckConfig()
    assert config.style == "pfeiffer" and config.dropout == 0.0 and config.cross_adapter is False
    config = BottleneckConfig(style="parallel", reduction_factor=8, non_linearity="GELU", scaling=1)
    assert (config.reduction_factor, config.non_linearity, config.scaling) == (8, "gelu", 1.0)


def test_the_saved_dict_holds_resolved_values_and_loads_back_the_same():
    config = BottleneckConfig(style="houlsby", feedforward_modules={"mlp"})
    data = config.to_dict()
    assert data["non_linearity"] == "swish" and data["feedforward_modules"] == ["mlp"]
    assert BottleneckConfig.from_dict(data) == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(style="adapter"),
            "BottleneckConfig.style must be one of 'houlsby', 'pfeiffer', 'parallel', got 'adapter'",
        ),
        (
            dict(reduction_factor=0.5),
            "BottleneckConfig.reduction_factor must be a number >= 1 (the bottleneck has "
            "hidden_size // reduction_factor features), got 0.5",
        ),
        (dict(reduction_factor="16"), "BottleneckConfig.reduction_factor must be a number >= 1"),
        (dict(reduction_factor=True), "BottleneckConfig.reduction_factor must be a number >= 1"),
        (dict(reduction_factor=float("inf")), "BottleneckConfig.reduction_factor must be a number >= 1"),
        (
            dict(non_linearity="softplus"),
            "BottleneckConfig.non_linearity must be one of 'relu', 'gelu', 'gelu_new', 'swish', 'silu', "
            "'tanh', 'sigmoid', 'leakyrelu', 'linear', got 'softplus'",
        ),
        (dict(scaling="learned"), "BottleneckConfig.scaling must be a finite number, got 'learned'"),
        (
            dict(init_weights="zeros"),
            "BottleneckConfig.init_weights must be one of 'mam_adapter', 'bert', 'houlsby', got 'zeros'",
        ),
        (dict(dropout=1.0), "BottleneckConfig.dropout must be a number in [0, 1), got 1.0"),
        (dict(cross_adapter="yes"), "BottleneckConfig.cross_adapter must be True or False, got 'yes'"),
        (
            dict(feedforward_modules=3),
            "BottleneckConfig.feedforward_modules must be a list of module names, a regex string or None",
        ),
        (
            dict(style="pfeiffer", attention_modules=["self_attn"]),
            "BottleneckConfig.attention_modules must be None with style='pfeiffer' (only 'houlsby' puts "
            "adapters after the attention block), got ['self_attn']",
        ),
        (dict(task_type="CLASSIFY"), "BottleneckConfig.task_type must be None or one of"),
    ],
)
def test_bad_values_fail_at_construction_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        BottleneckConfig(**kwargs)
    assert message in str(info.value)
