"""AdapterHub's bottleneck config (``adapters``' ``BnConfig``, as ``save_adapter`` writes it) and ours, both ways.

AdapterHub names the three styles by presets of one config: ``DoubleSeqBnConfig`` (Houlsby: adapters after
the attention and the feed-forward block), ``SeqBnConfig`` (Pfeiffer: after the feed-forward block, reading
the residual sum after its layer norm, ``original_ln_before=True``) and ``ParBnConfig`` (parallel: beside
the feed-forward block, ``is_parallel=True``). Options that peftkit-bottleneck does not implement (new layer
norms, gating, PHM layers, invertible adapters, learned scaling, ...) are read only at the value that
switches them off; any other value is a clear error naming the option.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from peftkit.errors import AdapterLoadError, ConfigError

from peftkit_bottleneck.config import BottleneckConfig

# BnConfig's fields and their defaults in adapters 1.3, as save_adapter writes them
BN_DEFAULTS: dict[str, Any] = {
    "original_ln_before": False,
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "init_weights": "bert",
    "init_weights_seed": None,
    "is_parallel": False,
    "scaling": 1.0,
    "use_gating": False,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "cross_adapter": False,
    "leave_out": [],
    "dropout": 0.0,
    "phm_layer": False,
    "phm_dim": 4,
    "factorized_phm_W": True,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "factorized_phm_rule": False,
    "phm_c_init": "normal",
    "phm_init_range": 0.0001,
    "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "phm_rank": 1,
    "phm_bias": True,
    "stochastic_depth": 0.0,
}

# options peftkit-bottleneck reads only at the value that leaves the feature out
ONLY_VALUE: dict[str, Any] = {
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "use_gating": False,
    "inv_adapter": None,
    "cross_adapter": False,
    "leave_out": [],
    "phm_layer": False,
    "stochastic_depth": 0.0,
}


def is_bottleneck(source: Mapping[str, Any]) -> bool:
    """Whether an AdapterHub adapter config (the ``"config"`` of ``adapter_config.json``) is a bottleneck one:
    AdapterHub's other methods (``lora``, ``prefix_tuning``, ``union``, ...) name their ``architecture``."""
    return source.get("architecture") in (None, "bottleneck") and "reduction_factor" in source


def from_adapterhub(source: Mapping[str, Any], where: str) -> BottleneckConfig:
    """A :class:`BottleneckConfig` that computes what AdapterHub's config ``source`` computes.

    ``where`` names the file in errors.
    """

    def refuse(option: str, value: Any, supported: str) -> AdapterLoadError:
        return AdapterLoadError(
            f"{where} sets the AdapterHub option {option}={value!r}, which peftkit-bottleneck cannot represent "
            f"(it reads {supported}); load this adapter with AdapterHub's adapters library instead"
        )

    for option, only in ONLY_VALUE.items():
        value = source.get(option, only)
        if value != only and not (only == [] and value is None):
            raise refuse(option, value, f"{option}={only!r} only")
    parallel = bool(source.get("is_parallel", False))
    if not parallel and source.get("residual_before_ln", True) is not True:
        raise refuse("residual_before_ln", source["residual_before_ln"], "residual_before_ln=True only")
    style = _style(source, parallel, refuse)
    scaling = source.get("scaling", 1.0)
    if isinstance(scaling, str):
        raise refuse("scaling", scaling, "a number only; 'learned' and 'channel' scaling are not implemented")
    reduction_factor = source.get("reduction_factor")
    if isinstance(reduction_factor, Mapping):
        if set(reduction_factor) != {"default"}:
            raise refuse("reduction_factor", dict(reduction_factor), "one reduction factor for every layer")
        reduction_factor = reduction_factor["default"]
    try:
        return BottleneckConfig(
            style=style,
            reduction_factor=reduction_factor,
            non_linearity=source.get("non_linearity"),
            scaling=scaling,
            init_weights=source.get("init_weights", "bert"),
            dropout=source.get("dropout", 0.0),
            original_ln_before=None if parallel else bool(source.get("original_ln_before", False)),
        )
    except ConfigError as exc:
        raise AdapterLoadError(
            f"{where}: the AdapterHub config does not fit peftkit-bottleneck: {exc}"
        ) from exc


def _style(source: Mapping[str, Any], parallel: bool, refuse: Any) -> str:
    mh_adapter, output_adapter = bool(source.get("mh_adapter")), bool(source.get("output_adapter"))
    if not output_adapter:
        raise refuse("output_adapter", source.get("output_adapter"), "output_adapter=True only")
    if parallel:
        if mh_adapter:
            raise refuse("mh_adapter", True, "mh_adapter=False with is_parallel=True only")
        return "parallel"
    return "houlsby" if mh_adapter else "pfeiffer"


def to_adapterhub(config: BottleneckConfig, adapter_name: str) -> dict[str, Any]:
    """AdapterHub's config (every ``BnConfig`` field) for a peftkit bottleneck adapter."""
    refused = {
        "attention_modules": config.attention_modules,
        "feedforward_modules": config.feedforward_modules,
        "modules_to_save": config.modules_to_save,
    }
    for field, value in refused.items():
        if value is not None:
            raise ConfigError(
                f"adapter {adapter_name!r} sets BottleneckConfig.{field}={value!r}, which AdapterHub's format "
                "cannot hold (AdapterHub places adapters by the model's architecture and saves no other "
                "modules); save it in peftkit's format instead: save_pretrained(folder)"
            )
    if config.cross_adapter:
        raise ConfigError(
            f"adapter {adapter_name!r} sets BottleneckConfig.cross_adapter=True; peftkit-bottleneck does not write "
            "AdapterHub's cross-attention adapters yet: save it in peftkit's format instead"
        )
    return {
        **BN_DEFAULTS,
        "mh_adapter": config.adapts_attention,
        "output_adapter": True,
        "is_parallel": config.is_parallel,
        "original_ln_before": bool(config.original_ln_before),
        "reduction_factor": config.reduction_factor,
        "non_linearity": config.non_linearity,
        "scaling": config.scaling,
        "init_weights": config.init_weights,
        "dropout": config.dropout,
    }
