"""Trainable tokens' hook implementations: register the method, find the embedding, wrap it (and its tie).

Targets are wrapped here rather than by :func:`peftkit.inject_into_targets`: the output head tied to the
embedding gets a layer that shares the embedding layer's rows, which the core's injection has no notion
of. Matching itself (names, suffixes, regexes, ``exclude_modules``) is the core's.
"""

from __future__ import annotations

from peftkit import MethodSpec, hookimpl, method_impl

from peftkit_trainable_tokens.config import TrainableTokensConfig


@hookimpl
def peftkit_register_methods() -> list[MethodSpec]:
    # weight-delta: the adapter is new values for rows of the embedding's weight, merged by writing them
    # in; each row (sample) of a batch looks its tokens up separately, so mixed batches work. Several
    # adapters may act at once when their token_indices are disjoint (PEFT's rule).
    return [
        MethodSpec(
            name="trainable_tokens",
            config_class=TrainableTokensConfig,
            peft_type="TRAINABLE_TOKENS",
            family="weight-delta",
        )
    ]


@method_impl("trainable_tokens")
def peftkit_inject_adapter(peft_model, config: TrainableTokensConfig, adapter_name: str) -> bool:
    # here, not at the top: loading the plugin (peftkit methods) stays torch-free
    from peftkit_trainable_tokens.targets import add_rows, default_target

    model = peft_model.base_model.model
    if config.target_modules is None:
        config.target_modules = default_target(model)
    add_rows(model, config, adapter_name)
    return True
