"""Where bottleneck adapters go in a model, and putting them there.

Insertion points come from the model's layout: for known architectures (by ``config.model_type``) a
:class:`Layout` says which module is the attention block, the feed-forward block and the
cross-attention block; ``attention_modules`` / ``feedforward_modules`` in the config name them for any
other model (and override the layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peftkit import LayerFeatures, TargetModulesError
from peftkit.adapter_layer import AdapterLayer
from peftkit.injection import candidate_modules, is_target
from peftkit.layer_access import LINEAR
from peftkit.plugins import layer_features
from torch import nn

from peftkit_bottleneck.config import BottleneckConfig
from peftkit_bottleneck.layer import (
    AFTER,
    AROUND_NORM,
    BESIDE,
    BESIDE_RESIDUAL,
    BESIDE_STREAM,
    READS_OUTPUT,
    BottleneckLayer,
    bottleneck_size,
)


@dataclass(frozen=True)
class Layout:
    """Regexes for the ends of module paths: the blocks whose outputs go into the residual stream.

    ``parallel_residual``: for models whose feed-forward output module adds the residual itself (BERT's
    ``BertOutput``), the module a parallel adapter wraps instead, adapting its residual input.

    ``attention_sum`` and ``feedforward_sum``: where the block's output has been added to the residual
    stream, for adapters with ``original_ln_before=True``; ``sum_placement`` says how an adapter sits
    there: ``around_norm`` on the layer norm that follows the residual add (post-norm models such as
    BERT), ``after`` the sub-layer or layer that returns the sum (pre-norm models).

    ``feedforward_norm``: on pre-norm models, the name of the layer norm (a sibling of the feed-forward
    block) whose input is the residual stream that a parallel adapter with ``parallel_input="residual"``
    reads.
    """

    attention: str
    feedforward: str
    cross_attention: str | None = None
    parallel_residual: str | None = None
    attention_sum: str | None = None
    feedforward_sum: str | None = None
    sum_placement: str = AFTER
    feedforward_norm: str | None = None


_BERT = Layout(
    attention=r"attention\.output\.dense",
    feedforward=r"layer\.\d+\.output\.dense",
    parallel_residual=r"layer\.\d+\.output",
    attention_sum=r"attention\.output\.LayerNorm",
    feedforward_sum=r"layer\.\d+\.output\.LayerNorm",
    sum_placement=AROUND_NORM,
)
# pre-norm decoders: the decoder layer returns the residual stream after its feed-forward block
_DECODER = Layout(
    attention=r"layers\.\d+\.self_attn",
    feedforward=r"layers\.\d+\.mlp",
    feedforward_sum=r"layers\.\d+",
    feedforward_norm="post_attention_layernorm",
)
_T5 = Layout(
    attention=r"SelfAttention",
    feedforward=r"DenseReluDense",
    cross_attention=r"EncDecAttention",
    # T5's sub-layers (self-attention, [cross-attention,] feed-forward) each add their own residual
    attention_sum=r"block\.\d+\.layer\.0",
    feedforward_sum=r"(?:encoder\.block\.\d+\.layer\.1|decoder\.block\.\d+\.layer\.2)",
    feedforward_norm="layer_norm",
)

LAYOUTS: dict[str, Layout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": Layout(
        attention=r"h\.\d+\.attn",
        feedforward=r"h\.\d+\.mlp",
        cross_attention=r"h\.\d+\.crossattention",
        feedforward_sum=r"h\.\d+",
        feedforward_norm="ln_2",
    ),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "t5": _T5,
    "mt5": _T5,
}


def add_adapters(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> None:
    """Wrap every block the config's style adapts in ``model`` and add the adapter there."""
    planned = []
    for path, placement, what in located_insertion_points(
        model, config
    ):  # every check first: a failure wraps nothing
        module = model.get_submodule(path)
        features = (
            module.features if isinstance(module, BottleneckLayer) else block_features(model, path, module)
        )
        _check_bottleneck(
            config, path, features.out_features if placement in READS_OUTPUT else features.in_features
        )
        norm = stream_norm(model, path) if placement == BESIDE_STREAM else None
        planned.append((path, placement, what, module, features, norm))
    for path, placement, what, module, features, norm in planned:
        training = module.training
        if not isinstance(module, BottleneckLayer):
            module = BottleneckLayer(module, features)
            model.set_submodule(path, module)
        if norm is not None:
            module.read_stream_at(norm)
        module.update_layer(adapter_name, config, path, placement=placement, block=what)
        # new submodules (dropout) start in training mode: give them the mode of the block they adapt
        module.train(training)


def insertion_points(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, str]]:
    """``(module path, placement)`` for every block the config's style adapts in this model, in model order."""
    return [(path, placement) for path, placement, _ in located_insertion_points(model, config)]


def located_insertion_points(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, str, str]]:
    """``(module path, placement, what)`` in model order; ``what`` is the config field that chose the block:
    ``"attention_modules"``, ``"feedforward_modules"`` or ``"cross_adapter"``."""
    candidates = [path for path, _ in candidate_modules(model)]
    points: dict[str, tuple[str, str]] = {}
    for what, spec, placement in _groups(model, config):
        found = [path for path in candidates if is_target(path, config, spec)]
        if not found:
            raise TargetModulesError(_no_match_message(model, config, what, spec))
        for path in found:
            points.setdefault(path, (placement, what))  # a block named twice gets one adapter
    _check_not_nested(model, list(points))
    return [(path, *points[path]) for path in candidates if path in points]


def _groups(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, Any, str]]:
    """``(field, which modules, placement)`` for each kind of block the style adapts."""
    layout = LAYOUTS.get(_model_type(model))
    after_or_beside = BESIDE if config.is_parallel else AFTER
    wanted = ["feedforward_modules"] + (["attention_modules"] if config.adapts_attention else [])
    if layout is None and any(getattr(config, name) is None for name in wanted):
        raise TargetModulesError(_unknown_layout_message(model, config))
    groups = []
    feedforward_placement = after_or_beside
    if config.reads_residual_stream and not (layout and layout.parallel_residual):
        feedforward_placement = _stream_placement(model, layout)
    if config.feedforward_modules is not None:
        groups.append(("feedforward_modules", config.feedforward_modules, feedforward_placement))
    elif config.is_parallel and layout.parallel_residual:
        # post-norm: the feed-forward block's residual input is both the stream and the block's input
        groups.append(("feedforward_modules", _suffix(layout.parallel_residual), BESIDE_RESIDUAL))
    elif config.reads_normalized_sum:
        sum_block = _sum_block(model, config, layout, "feedforward")
        groups.append(("feedforward_modules", _suffix(sum_block), layout.sum_placement))
    else:
        groups.append(("feedforward_modules", _suffix(layout.feedforward), feedforward_placement))
    if config.adapts_attention:
        if config.attention_modules is not None:
            spec, placement = config.attention_modules, AFTER
        elif config.reads_normalized_sum:
            spec, placement = _suffix(_sum_block(model, config, layout, "attention")), layout.sum_placement
        else:
            spec, placement = _suffix(layout.attention), AFTER
        groups.append(("attention_modules", spec, placement))
    if config.cross_adapter:
        if layout is None or layout.cross_attention is None:
            raise TargetModulesError(
                f"BottleneckConfig.cross_adapter=True, but peftkit-bottleneck knows no cross-attention block in "
                f"{type(model).__name__} (model_type {_model_type(model)!r}); set cross_adapter=False and list "
                "the cross-attention blocks in attention_modules (style='houlsby') instead"
            )
        groups.append(("cross_adapter", _suffix(layout.cross_attention), after_or_beside))
    return groups


def _stream_placement(model: nn.Module, layout: Layout | None) -> str:
    if layout is None or layout.feedforward_norm is None:
        raise TargetModulesError(
            f"BottleneckConfig(style='parallel', parallel_input='residual') reads the residual stream at the "
            f"input of the layer norm before the feed-forward block, and peftkit-bottleneck does not know that "
            f"norm in {type(model).__name__} (model_type {_model_type(model)!r}); set parallel_input="
            "'block_input' to read the feed-forward block's own input"
        )
    return BESIDE_STREAM


def stream_norm(model: nn.Module, path: str) -> nn.Module:
    """The layer norm beside the feed-forward block at ``path`` whose input is the residual stream."""
    layout = LAYOUTS[_model_type(model)]
    parent_path, _, _ = path.rpartition(".")
    norm = getattr(model.get_submodule(parent_path), layout.feedforward_norm, None)
    if not isinstance(norm, nn.Module):
        raise TargetModulesError(
            f"a parallel adapter on {path!r} reads the residual stream at the input of its sibling "
            f"{layout.feedforward_norm!r}, which {parent_path!r} does not have; name feed-forward blocks that sit "
            "beside that norm, or set BottleneckConfig.parallel_input='block_input'"
        )
    # the innermost module: an adapter on the norm itself (LN tuning) may be unloaded, the norm stays
    return norm.get_base_layer() if isinstance(norm, AdapterLayer) else norm


def _sum_block(model: nn.Module, config: BottleneckConfig, layout: Layout, block: str) -> str:
    """The layout's regex for where the ``block``'s output has joined the residual stream."""
    pattern = getattr(layout, f"{block}_sum")
    if pattern is None:
        raise TargetModulesError(
            f"BottleneckConfig.original_ln_before=True puts adapters where the {block} block's output has been "
            f"added to the residual stream, and {type(model).__name__} (model_type {_model_type(model)!r}) has "
            f"no module there; set original_ln_before=False (the adapter then reads the {block} block's "
            f"output), or name the modules with BottleneckConfig.{block}_modules"
        )
    return pattern


def _no_match_message(model: nn.Module, config: BottleneckConfig, what: str, spec: Any) -> str:
    logical = [
        path.replace(".base_layer.", ".") for path, _ in model.named_modules() if ".base_layer." in path
    ]
    nested = next((path for path in logical if is_target(path, config, spec)), None)
    if nested is not None:  # the block is there, inside another adapter layer
        return _nesting_message(nested)
    if getattr(config, what, None) == spec:
        return (
            f"BottleneckConfig.{what}={spec!r} matched no module of {type(model).__name__}; name the blocks "
            "to adapt (a list of module names or name suffixes, or a regex on the full path)"
        )
    return (
        f"the {what.removesuffix('_modules')} blocks that peftkit-bottleneck expects in a model_type "
        f"{_model_type(model)!r} model (paths matching {spec!r}) are not in {type(model).__name__}; name them "
        f"with BottleneckConfig.{what if what != 'cross_adapter' else 'attention_modules'}"
    )


def _check_not_nested(model: nn.Module, paths: list[str]) -> None:
    """Refuse to wrap a block inside (or around) another bottleneck wrapper: the saved paths would then
    depend on the order adapters were added. (BERT's layout puts parallel adapters on ``output`` and
    sequential ones on ``output.dense``.)"""
    wrapped = [path for path, module in model.named_modules() if isinstance(module, BottleneckLayer)]
    for path in paths:
        for other in wrapped + paths:
            if path.startswith(other + ".") or other.startswith(path + "."):
                raise TargetModulesError(_nesting_message(path))


def _nesting_message(path: str) -> str:
    return (
        f"a bottleneck adapter for {path!r} would nest with another bottleneck block around or inside it; "
        "name blocks that do not contain one another (on BERT-style models parallel adapters wrap 'output' "
        "and sequential ones 'output.dense', so keep one model's bottleneck adapters all parallel or all "
        "sequential; on decoders, adapters with original_ln_before=True (the 'pfeiffer' default) wrap the "
        "decoder layer, so keep them apart from adapters on its attention or MLP)"
    )


def block_features(model: nn.Module, path: str, module: nn.Module) -> LayerFeatures:
    """The sizes a block reads and writes: a layer's own, else the model's hidden size, else its inner layers'."""
    base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    features = layer_features(base)
    if features is not None and features.kind == LINEAR:
        return features
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        return LayerFeatures(kind=LINEAR, in_features=hidden, out_features=hidden)
    inner = [f for f in map(layer_features, base.modules()) if f is not None and f.kind == LINEAR]
    if inner:
        return LayerFeatures(
            kind=LINEAR, in_features=inner[0].in_features, out_features=inner[-1].out_features
        )
    raise TargetModulesError(
        f"cannot tell the hidden size of {path!r} ({type(base).__name__}): the model has no config.hidden_size "
        "and the module holds no linear layer; name a block that ends in a linear layer"
    )


def _check_bottleneck(config: BottleneckConfig, path: str, d_in: int) -> None:
    if bottleneck_size(config, d_in) < 1:
        raise TargetModulesError(
            f"BottleneckConfig.reduction_factor={config.reduction_factor!r} leaves no bottleneck feature for "
            f"{path!r}, whose adapter reads {d_in} features; use a reduction_factor of at most {d_in}"
        )


def _suffix(pattern: str) -> str:
    """A regex for full module paths that end in ``pattern``."""
    return rf"(?:.*\.)?{pattern}"


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _unknown_layout_message(model: nn.Module, config: BottleneckConfig) -> str:
    needed = "attention_modules and feedforward_modules" if config.adapts_attention else "feedforward_modules"
    return (
        f"peftkit-bottleneck does not know where the attention and feed-forward blocks of "
        f"{type(model).__name__} (model_type {_model_type(model)!r}) are; set BottleneckConfig.{needed} "
        f"for style={config.style!r} (module names or name suffixes, e.g. feedforward_modules=['mlp'], or a "
        f"regex on the full path). Known model types: {', '.join(sorted(LAYOUTS))}"
    )
