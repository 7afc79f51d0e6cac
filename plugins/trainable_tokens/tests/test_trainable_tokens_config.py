"""TrainableTokensConfig: PEFT's fields and defaults, and messages that name the field and the fix."""

from __future__ import annotations

import dataclasses

import peft
import pytest
from peftkit import ConfigError
from peftkit_trainable_tokens import TrainableTokensConfig


def test_fields_and_defaults_are_peft_s():
    ours = TrainableTokensConfig(token_indices=[1])
    theirs = peft.TrainableTokensConfig(token_indices=[1])
    assert ours.peft_type == "TRAINABLE_TOKENS" == theirs.peft_type.value
    for field in ("token_indices", "target_modules", "init_weights"):
        assert getattr(ours, field) == getattr(theirs, field), field
    method_fields = {f.name for f in dataclasses.fields(TrainableTokensConfig)}
    assert {"token_indices", "target_modules", "init_weights"} <= method_fields


def test_round_trips_through_peft_s_dict():
    config = TrainableTokensConfig(token_indices=[5, 1], target_modules=["wte"], init_weights=False)
    again = TrainableTokensConfig.from_dict(
        peft.TrainableTokensConfig(
            **{
                k: v
                for k, v in config.to_dict().items()
                if k in ("token_indices", "target_modules", "init_weights")
            }
        ).to_dict()
    )
    assert (again.token_indices, again.target_modules, again.init_weights) == ([5, 1], ["wte"], False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(token_indices=[]), r"token_indices must be a non-empty list of the token ids .*, got \[\]"),
        (dict(token_indices=[1, "2"]), r"token_indices must be a list of int token ids, got \[1, '2'\]"),
        (dict(token_indices=[1, True]), r"token_indices must be a list of int token ids, got \[1, True\]"),
        (dict(token_indices=3), r"token_indices must be a list of int token ids, got 3"),
        (dict(token_indices=[4, -1]), r"token_indices must be non-negative row indices .*, got \[4, -1\]"),
        (
            dict(token_indices=[4, 5, 4]),
            r"token_indices must be a list naming each token once \(\[4\] repeat\)",
        ),
        (dict(token_indices=[1], init_weights="yes"), r"init_weights must be True or False, got 'yes'"),
        (dict(token_indices=[1], target_modules=[3]), r"TrainableTokensConfig.target_modules must be"),
    ],
)
def test_invalid_values_are_refused_with_the_field_and_the_fix(kwargs, message):
    with pytest.raises(
        ConfigError, match="^TrainableTokensConfig." + message.removeprefix("TrainableTokensConfig.")
    ):
        TrainableTokensConfig(**kwargs)


def test_a_tuple_of_indices_becomes_a_list():
    assert TrainableTokensConfig(token_indices=(3, 4)).token_indices == [3, 4]
