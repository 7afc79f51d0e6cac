"""AdapterFusion (Pfeiffer et al., 2021): at each block, attention over what several bottleneck adapters make.

For a block whose adapters read ``h`` (the state a sequential adapter reads, see :mod:`peftkit_bottleneck.layer`),
each fused adapter ``i`` gives ``uᵢ = scaling · up(act(down(h)))``; with ``q = Q h``, ``kᵢ = K uᵢ`` and
``vᵢ = V uᵢ`` the fusion adds ``Σᵢ softmax(q·kᵢ / T)ᵢ vᵢ`` to the block's residual stream. ``Q``, ``K`` and
``V`` are square linear maps (``V`` without bias, starting at the identity when ``value_initialized``).

The fusion is an adapter of its own (method ``adapter_fusion``, named as AdapterHub names it: the fused
adapters' names joined by ``","``), living in the bottleneck layers that hold every fused adapter. It runs
under ``set_adapter(Fuse("a", "b"))``, which trains the fusion only. Its options and their presets are
AdapterHub's ``AdapterFusionConfig``: ``"dynamic"`` (the default) and ``"static"`` (no value matrix).
"""

from __future__ import annotations

from typing import Any

import torch
from peftkit.errors import ConfigError, TargetModulesError
from torch import nn

from peftkit_bottleneck.fusion_config import REGULARIZATION_WEIGHT, AdapterFusionConfig


def _bert_init(linear: nn.Linear) -> None:
    nn.init.normal_(linear.weight, std=0.02)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class FusionLayer(nn.Module):
    """The fusion at one block: ``forward(query, outputs, residual)`` with ``outputs`` of shape
    ``(..., adapters, hidden)`` and ``query``, ``residual`` of shape ``(..., hidden)``."""

    def __init__(self, config: AdapterFusionConfig, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.residual_before = config.residual_before
        self.value_before_softmax = config.value_before_softmax
        self.dropout = nn.Dropout(dropout_prob)
        if config.query:
            self.query = nn.Linear(hidden_size, hidden_size)
            _bert_init(self.query)
        if config.key:
            self.key = nn.Linear(hidden_size, hidden_size)
            _bert_init(self.key)
        if config.value:
            self.value = nn.Linear(hidden_size, hidden_size, bias=False)
            _bert_init(self.value)
            if config.value_initialized:
                with torch.no_grad():
                    self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.start = 50.0 if config.temperature else 1.0
        self.cooling = self.start / 1000.0 if config.temperature else 0.0
        # the forwards run so far, an integer: a float buffer would take the model's dtype (in bfloat16,
        # 50 - 0.05 rounds back to 50), and cooling it in place would break the backward of the softmax
        self.register_buffer("forwards", torch.tensor(0), persistent=False)

    @property
    def temperature(self) -> torch.Tensor:
        """AdapterHub's softmax temperature ``T``: ``start − cooling · forwards``, at least 1 (float32)."""
        return torch.clamp(self.start - self.cooling * self.forwards.float(), min=1.0)

    def forward(self, query: torch.Tensor, outputs: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.residual_before:
            outputs = outputs + residual.unsqueeze(-2)
        query = self.query(query) if hasattr(self, "query") else query
        keys = self.key(outputs) if hasattr(self, "key") else outputs
        values = self.value(outputs) if hasattr(self, "value") and self.value_before_softmax else outputs
        scores = self.dropout((keys @ query.unsqueeze(-1)).squeeze(-1))  # (..., adapters)
        probs = torch.softmax(scores / self.temperature, dim=-1)
        if self.cooling:
            with torch.no_grad():
                self.forwards.add_(1)
        context = (probs.unsqueeze(-2) @ values).squeeze(-2)
        if hasattr(self, "value") and not self.value_before_softmax:
            context = self.value(context)
        return context if self.residual_before else context + residual

    def regularization(self) -> torch.Tensor | None:
        """``0.01 · ‖I − V‖²`` (AdapterHub's), or None without a value matrix."""
        if not hasattr(self, "value"):
            return None
        weight = self.value.weight
        identity = torch.eye(weight.shape[0], device=weight.device, dtype=weight.dtype)
        return REGULARIZATION_WEIGHT * (identity - weight).pow(2).sum()


# --- the fusion as an adapter of a PeftModel -----------------------------------------------------------------
def add_adapter_fusion(
    peft_model: Any,
    adapter_names: Any,
    config: str | dict[str, Any] | AdapterFusionConfig = "dynamic",
    name: str | None = None,
    set_active: bool = False,
) -> str:
    """AdapterHub's ``model.add_adapter_fusion``: a fusion over bottleneck adapters already on the model.

    :param adapter_names: a ``Fuse`` block or a list of adapter names.
    :param config: a preset name (``"dynamic"``, ``"static"``), a dict of AdapterHub's fusion options, or an
        :class:`AdapterFusionConfig`.
    :param name: the fusion's name; by default AdapterHub's, the fused names joined by ``","``.
    :param set_active: activate ``Fuse(...)`` afterwards (the fusion then trains, the adapters stay frozen).
    :return: the fusion's adapter name; ``model.set_adapter(Fuse(...))`` runs it.
    """
    import copy

    from peftkit.composition import Fuse

    fuse = adapter_names if isinstance(adapter_names, Fuse) else Fuse(*adapter_names, name=name)
    fused = [child if isinstance(child, str) else child.last() for child in fuse]
    if isinstance(config, str):
        config = AdapterFusionConfig(adapter_names=fused, preset=config)
    elif isinstance(config, dict):
        config = AdapterFusionConfig.from_options(fused, config)
    elif isinstance(config, AdapterFusionConfig):
        config = copy.deepcopy(config)
        config.adapter_names = fused
    else:
        raise ConfigError(
            f"add_adapter_fusion(config=...) takes 'dynamic', 'static', a dict of fusion options or an "
            f"AdapterFusionConfig, got {type(config).__name__}"
        )
    peft_model.add_adapter(fuse.name, config)
    if set_active:
        peft_model.set_adapter(fuse)
    return fuse.name


def add_fusion_layers(peft_model: Any, config: AdapterFusionConfig, adapter_name: str) -> None:
    """A fusion layer in every bottleneck block that holds all the fused adapters."""
    from peftkit_bottleneck.layer import BottleneckLayer

    known = peft_model.peft_config
    missing = [name for name in config.adapter_names if name not in known]
    if missing:
        raise ConfigError(
            f"AdapterFusion {adapter_name!r} fuses {missing}, which this model does not have; add those bottleneck "
            f"adapters first. Adapters: {sorted(name for name in known if name != adapter_name)}"
        )
    for name in config.adapter_names:
        adapter = known[name]
        if getattr(type(adapter), "method", None) != "bottleneck":
            raise ConfigError(
                f"AdapterFusion {adapter_name!r} fuses {name!r}, a {type(adapter).__name__} adapter; "
                "AdapterFusion fuses bottleneck adapters"
            )
        if adapter.is_parallel:
            raise ConfigError(
                f"AdapterFusion {adapter_name!r} fuses {name!r}, a parallel bottleneck adapter; fuse sequential "
                "(houlsby or pfeiffer) adapters (AdapterHub 1.3 adds the residual twice for parallel ones)"
            )
    layers = [
        layer
        for _, layer in peft_model.adapter_layers()
        if isinstance(layer, BottleneckLayer)
        and all(name in layer.placement for name in config.adapter_names)
    ]
    if not layers:
        raise TargetModulesError(
            f"the adapters {config.adapter_names} share no block of the model, so AdapterFusion {adapter_name!r} "
            "has nowhere to sit; fuse adapters of one style (they then adapt the same blocks)"
        )
    model_config = getattr(peft_model.base_model.model, "config", None)
    dropout = config.dropout_prob
    if dropout is None:
        dropout = getattr(model_config, "attention_probs_dropout_prob", 0.0) or 0.0
    for layer in layers:
        layer.add_fusion(adapter_name, config, dropout)
        layer.adapter_fusion[adapter_name].train(layer.training)


def with_regularization(peft_model: Any, config: AdapterFusionConfig, adapter_name: str, outputs: Any) -> Any:
    """While training, the loss plus ``0.01 · ‖I − V‖²`` of each of the fusion's layers (AdapterHub's
    regulariser, which its AdapterTrainer backpropagates after each step; added to the loss here). A loss
    computed outside the model takes :func:`get_fusion_regularization_loss` instead."""
    loss = getattr(outputs, "loss", None)
    if not (config.regularization and peft_model.training and isinstance(loss, torch.Tensor)):
        return None
    term = _regularization(peft_model, [adapter_name])
    if term is None:
        return None
    outputs.loss = loss + term.to(loss.dtype)
    return outputs


def get_fusion_regularization_loss(peft_model: Any) -> torch.Tensor | None:
    """AdapterHub's ``model.get_fusion_regularization_loss()``: ``0.01 · ‖I − V‖²`` summed over the layers
    of the active fusions that regularise, for a loss computed outside the model (one the model computes
    has it added already, while training); None when there is none."""
    names = [
        name
        for name in peft_model.active_adapters
        if isinstance(peft_model.peft_config[name], AdapterFusionConfig)
        and peft_model.peft_config[name].regularization
    ]
    return _regularization(peft_model, names)


def _regularization(peft_model: Any, fusion_names: list[str]) -> torch.Tensor | None:
    from peftkit_bottleneck.layer import BottleneckLayer

    terms = [
        layer.adapter_fusion[name].regularization()
        for _, layer in peft_model.adapter_layers()
        if isinstance(layer, BottleneckLayer)
        for name in fusion_names
        if name in layer.adapter_fusion
    ]
    terms = [term for term in terms if term is not None]
    return torch.stack(terms).sum() if terms else None
