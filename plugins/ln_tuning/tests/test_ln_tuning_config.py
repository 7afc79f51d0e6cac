"""LNTuningConfig: PEFT's fields and defaults, and error messages that name the field, value and remedy."""

from __future__ import annotations

import dataclasses

import peft
import pytest
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING
from peftkit import ConfigError, TargetModulesError, get_peft_model
from peftkit.testing.models import tiny_bert, tiny_gpt2, tiny_llama, tiny_plain, tiny_t5
from peftkit_ln_tuning import LNTuningConfig
from peftkit_ln_tuning.plugin import DEFAULT_TARGETS


def test_fields_and_defaults_are_peft_s():
    ours = {f.name: f.default for f in dataclasses.fields(LNTuningConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.LNTuningConfig)}
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        assert ours[name] is None and theirs[name] is None
    # every other field of PEFT's is one of PeftConfig's, which peftkit's base class has too (but
    # peft_version, which PEFT stamps on what it writes)
    assert set(theirs) - set(ours) == {"peft_version"}
    assert LNTuningConfig().peft_type == "LN_TUNING"


def test_default_targets_are_peft_s_table():
    assert DEFAULT_TARGETS == TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(target_modules=3),
            r"LNTuningConfig\.target_modules must be a list of module names, a regex string or None, got 3",
        ),
        (
            dict(exclude_modules=["ln_1", 2]),
            r"LNTuningConfig\.exclude_modules must be a list of module names, a regex string or None, "
            r"got \['ln_1', 2\]",
        ),
        (
            dict(modules_to_save="score"),
            r"LNTuningConfig\.modules_to_save must be a list of module names or None, got 'score'",
        ),
    ],
)
def test_bad_fields_are_named_with_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LNTuningConfig(**kwargs)


def test_sets_of_names_become_sorted_lists():
    assert LNTuningConfig(target_modules={"ln_2", "ln_1"}).target_modules == ["ln_1", "ln_2"]


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (tiny_llama, ["input_layernorm", "post_attention_layernorm", "norm"]),
        (tiny_gpt2, ["ln_1", "ln_2", "ln_f"]),
        (tiny_t5, ["layer_norm", "final_layer_norm"]),
    ],
)
def test_none_takes_the_architecture_s_norms(build, expected):
    model = get_peft_model(build(), LNTuningConfig())
    assert model.peft_config["default"].target_modules == expected


def test_an_architecture_without_defaults_asks_for_norm_names():
    with pytest.raises(
        TargetModulesError,
        match=r"LNTuningConfig\.target_modules is None and peftkit-ln-tuning has no default for model_type "
        r"'bert'; name the norm layers to tune \(e\.g\. target_modules=\['LayerNorm'\]",
    ):
        get_peft_model(tiny_bert(), LNTuningConfig())


def test_a_target_without_parameters_is_refused():
    with pytest.raises(TargetModulesError, match=r"matched 'model\.layers\.0\.mlp\.act_fn', a \w+ without"):
        get_peft_model(tiny_llama(), LNTuningConfig(target_modules=["act_fn"]))


def test_names_that_match_nothing_say_so():
    with pytest.raises(
        TargetModulesError, match=r"LNTuningConfig\.target_modules=\['ln_9'\] matched no module"
    ):
        get_peft_model(tiny_plain(), LNTuningConfig(target_modules=["ln_9"]))


def test_exclude_modules_leaves_norms_out():
    model = get_peft_model(tiny_llama(), LNTuningConfig(exclude_modules=["norm"]))
    assert [path for path, _ in model.adapter_layers()] == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
    ]
