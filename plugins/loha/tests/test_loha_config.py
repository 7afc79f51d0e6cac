"""LoHaConfig: PEFT's fields and defaults, and a clear error for each bad value."""

from __future__ import annotations

import dataclasses

import peft
import peftkit
import pytest
import torch
from peftkit import ConfigError, TargetModulesError
from peftkit.testing.models import tiny_bert, tiny_gpt2, tiny_llama, tiny_plain
from peftkit_loha import LoHaConfig, LoHaLayer


def test_fields_and_defaults_are_peft_s():
    ours = LoHaConfig().to_dict()
    theirs = peft.LoHaConfig().to_dict()
    theirs.pop("peft_version")
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name] == (value.value if hasattr(value, "value") else value), name


def test_re_exported_from_peftkit():
    assert peftkit.LoHaConfig is LoHaConfig


def test_loads_a_peft_saved_config_dict():
    data = peft.LoHaConfig(
        r=4, alpha=16, target_modules=["q_proj", "v_proj"], use_effective_conv2d=True, rank_pattern={"q": 2}
    ).to_dict()
    data = {k: (v.value if hasattr(v, "value") else v) for k, v in data.items()}
    data["target_modules"] = sorted(data["target_modules"])
    config = LoHaConfig.from_dict(data)
    assert (config.r, config.alpha, config.use_effective_conv2d) == (4, 16, True)
    assert config.target_modules == ["q_proj", "v_proj"] and config.rank_pattern == {"q": 2}


def test_target_sets_become_sorted_lists():
    assert LoHaConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]


BAD = [
    (dict(r=0), "LoHaConfig.r must be an integer >= 1, got 0"),
    (dict(r=2.5), "LoHaConfig.r must be an integer >= 1, got 2.5"),
    (dict(r=True), "LoHaConfig.r must be an integer >= 1, got True"),
    (dict(alpha=0), "LoHaConfig.alpha must be a positive number, got 0"),
    (dict(alpha="8"), "LoHaConfig.alpha must be a positive number, got '8'"),
    (dict(rank_dropout=1.0), "LoHaConfig.rank_dropout must be a number in [0, 1), got 1.0"),
    (dict(rank_dropout=-0.1), "LoHaConfig.rank_dropout must be a number in [0, 1), got -0.1"),
    (dict(module_dropout=1.5), "LoHaConfig.module_dropout must be a number in [0, 1), got 1.5"),
    (dict(module_dropout="0.1"), "LoHaConfig.module_dropout must be a number in [0, 1), got '0.1'"),
    (dict(use_effective_conv2d="yes"), "LoHaConfig.use_effective_conv2d must be True or False, got 'yes'"),
    (dict(init_weights="gaussian"), "LoHaConfig.init_weights must be True or False, got 'gaussian'"),
    (
        dict(target_modules=[1]),
        "LoHaConfig.target_modules must be a list of module names, a regex string or None, got [1]",
    ),
    (
        dict(exclude_modules=5),
        "LoHaConfig.exclude_modules must be a list of module names, a regex string or None, got 5",
    ),
    (
        dict(layers_to_transform=[-1]),
        "LoHaConfig.layers_to_transform must be None, a layer index or a list of layer indices, got [-1]",
    ),
    (
        dict(target_modules=".*q_proj", layers_to_transform=0),
        "LoHaConfig.layers_to_transform must be None when target_modules is a regex string, got 0",
    ),
    (
        dict(layers_pattern="layers"),
        "LoHaConfig.layers_pattern must be None unless layers_to_transform is set, got 'layers'",
    ),
    (
        dict(rank_pattern={"q_proj": 0}),
        "LoHaConfig.rank_pattern must be a dict of module regex to a positive integer rank, got {'q_proj': 0}",
    ),
    (
        dict(rank_pattern=["q_proj"]),
        "LoHaConfig.rank_pattern must be a dict of module regex to a positive integer rank, got ['q_proj']",
    ),
    (
        dict(rank_pattern={"q_proj(": 2}),
        "LoHaConfig.rank_pattern must be a dict of module regex to a positive integer rank (the key is not "
        "a regex: missing ), unterminated subpattern at position 6), got {'q_proj(': 2}",
    ),
    (
        dict(alpha_pattern={"v_proj": -1}),
        "LoHaConfig.alpha_pattern must be a dict of module regex to a positive alpha, got {'v_proj': -1}",
    ),
    (
        dict(alpha_pattern={"v_proj": "big"}),
        "LoHaConfig.alpha_pattern must be a dict of module regex to a positive alpha, got {'v_proj': 'big'}",
    ),
    (dict(task_type="CAUSAL"), "LoHaConfig.task_type must be None or one of"),
]


@pytest.mark.parametrize(
    "kwargs, message", BAD, ids=[next(iter(k)) + f"={next(iter(k.values()))!r}" for k, _ in BAD]
)
def test_bad_values_fail_at_construction_naming_field_and_allowed(kwargs, message):
    with pytest.raises(ConfigError) as info:
        LoHaConfig(**kwargs)
    assert str(info.value).startswith(message)


def test_fine_values_pass():
    config = LoHaConfig(
        r=1,
        alpha=0.5,
        rank_dropout=0.0,
        module_dropout=0.99,
        layers_to_transform=0,
        layers_pattern=["layers"],
    )
    assert dataclasses.replace(config, r=3).r == 3


def test_default_targets_for_a_known_architecture():
    model = peftkit.get_peft_model(tiny_llama(), LoHaConfig(r=2))
    assert {path.split(".")[-1] for path, _ in model.adapter_layers()} == {"q_proj", "v_proj"}


def test_unknown_architecture_without_targets_is_refused():
    with pytest.raises(
        TargetModulesError, match="LoHaConfig.target_modules is None and peftkit-loha has no default"
    ):
        peftkit.get_peft_model(tiny_plain(), LoHaConfig())


def test_transposed_conv1d_layers_are_refused_before_any_change():
    base = tiny_gpt2()
    before = {name: p.clone() for name, p in base.state_dict().items()}
    with pytest.raises(
        TargetModulesError,
        match=r"module 'transformer.h.0.attn.c_attn' .* Conv1D .* nn.Linear, nn.Conv1d and nn.Conv2d",
    ):
        peftkit.get_peft_model(base, LoHaConfig(target_modules=["c_attn"]))
    assert not any(isinstance(m, LoHaLayer) for m in base.modules())
    assert all(torch.equal(p, before[name]) for name, p in base.state_dict().items())


def test_embedding_targets_are_refused_before_any_change():
    base = tiny_bert()
    with pytest.raises(
        TargetModulesError, match=r"'bert.embeddings.word_embeddings' .* \(its kind: embedding\)"
    ):
        peftkit.get_peft_model(
            base, LoHaConfig(target_modules=["query", "word_embeddings"], task_type="SEQ_CLS")
        )
    assert not any(isinstance(m, LoHaLayer) for m in base.modules())
