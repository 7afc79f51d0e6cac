"""The bottleneck adapter around one block of a model.

An adapter is a small network ``a(h) = dropout(scaling · up(act(down(h))))`` with ``down: d_in → m`` and
``up: m → d_out``, ``m = d_in // reduction_factor``. Where it reads and where it adds depends on its
placement at this block ``f``:

- ``after`` (Houlsby, Pfeiffer): ``y = f(x) + a(f(x))``, on the first element when ``f`` returns a tuple;
- ``beside`` (parallel): ``y = f(x) + a(x)``;
- ``beside_residual`` (parallel where ``f`` adds its own residual and normalises, as BERT's ``BertOutput``
  computes ``LayerNorm(dense(h) + r)``): ``y = f(h, r + a(r))``, which is ``LayerNorm(dense(h) + a(r) + r)``;
- ``around_norm`` (sequential, reading the normalised residual sum, where ``f`` is the layer norm after a
  residual connection, as BERT's ``LayerNorm(dense(h) + r)``): ``y = f(s + a(f(s)))`` for its input ``s``,
  AdapterHub's ``original_ln_before=True``.

With ``up`` zero (the ``mam_adapter`` init) ``a`` is zero, so a new adapter leaves ``f`` unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peftkit import AdapterLayer
from peftkit.layer_access import LINEAR, LayerFeatures
from torch import nn

AFTER, BESIDE, BESIDE_RESIDUAL, AROUND_NORM = "after", "beside", "beside_residual", "around_norm"
PLACEMENTS = (AFTER, BESIDE, BESIDE_RESIDUAL, AROUND_NORM)
# the placements whose adapter reads what the block writes (the others read what it reads)
READS_OUTPUT = (AFTER, AROUND_NORM)

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leakyrelu": nn.LeakyReLU,
    "linear": nn.Identity,
}


def bottleneck_size(config: Any, d_in: int) -> int:
    return int(d_in // config.reduction_factor)


class BottleneckLayer(AdapterLayer):
    """A block with bottleneck adapters; ``features`` gives the sizes the block reads and writes."""

    adapter_tensor_names = ("adapter_down", "adapter_up")
    adapter_state_names = ("adapter_act", "adapter_dropout", "placement", "scaling")
    supported_kinds = (LINEAR,)

    def __init__(self, base_layer: nn.Module, features: LayerFeatures) -> None:
        super().__init__(base_layer, features)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.placement: dict[str, str] = {}
        self.scaling: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: Any, module_name: str, placement: str = AFTER) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        d_out = self.features.out_features
        d_in = d_out if placement in READS_OUTPUT else self.features.in_features
        m = bottleneck_size(config, d_in)
        self.adapter_down[adapter_name] = nn.Linear(d_in, m)
        self.adapter_up[adapter_name] = nn.Linear(m, d_out)
        self.adapter_act[adapter_name] = ACTIVATIONS[config.non_linearity]()
        self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.placement[adapter_name] = placement
        self.scaling[adapter_name] = config.scaling
        self._init(adapter_name, config.init_weights)
        self._move_to_base(self.adapter_down[adapter_name], self.adapter_up[adapter_name])

    @torch.no_grad()
    def _init(self, adapter_name: str, init_weights: str) -> None:
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        for bias in (down.bias, up.bias):
            nn.init.zeros_(bias)
        if init_weights == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        elif init_weights == "bert":
            nn.init.normal_(down.weight, std=0.02)
            nn.init.normal_(up.weight, std=0.02)
        else:  # "houlsby": near zero, truncated at two standard deviations
            for weight in (down.weight, up.weight):
                nn.init.trunc_normal_(weight, std=1e-2, a=-2e-2, b=2e-2)

    def adapter_delta(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``dropout(scaling · up(act(down(h))))``, computed in the adapter's dtype and cast back to h's."""
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        z = self.adapter_act[adapter_name](down(h.to(down.weight.dtype)))
        return self.adapter_dropout[adapter_name](up(z) * self.scaling[adapter_name]).to(h.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # blocks are called positionally (an MLP) or by keyword (Llama's self_attn(hidden_states=...)):
        # take the arguments as they come and find the block's input only when an adapter reads it
        pending = [] if self.disabled else self.active_adapters
        residual_names = [name for name in pending if self.placement[name] == BESIDE_RESIDUAL]
        if residual_names:
            args, kwargs = self._with_adapted_residual(residual_names, args, kwargs)
        result = self.base_layer(*args, **kwargs)
        norm_names = [name for name in pending if self.placement[name] == AROUND_NORM]
        if norm_names:
            result = self._around_norm(norm_names, result, args, kwargs)
        output_names = [name for name in pending if self.placement[name] in (AFTER, BESIDE)]
        if not output_names:
            return result
        reads_input = any(self.placement[name] == BESIDE for name in output_names)
        x = self._block_input(args, kwargs) if reads_input else None
        return self.adapter_output(x, result, output_names)

    def adapter_output(self, x: torch.Tensor | None, result: Any, adapter_names: list[str]) -> Any:
        h = result[0] if isinstance(result, tuple) else result
        out = h
        for name in adapter_names:
            out = out + self.adapter_delta(name, h if self.placement[name] == AFTER else x)
        return (out, *result[1:]) if isinstance(result, tuple) else out

    def _block_input(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        if args:
            return args[0]
        if "hidden_states" in kwargs:
            return kwargs["hidden_states"]
        raise TypeError(
            f"{type(self.base_layer).__name__} was called without a positional input or hidden_states=, so a "
            "parallel bottleneck adapter cannot read its input"
        )

    def _around_norm(
        self, adapter_names: list[str], normed: torch.Tensor, args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        """The norm ``f`` once more, of its input ``s`` plus every adapter's output on ``f(s)``."""
        s = self._block_input(args, kwargs)
        adapted = s
        for name in adapter_names:
            adapted = adapted + self.adapter_delta(name, normed)
        if args:
            return self.base_layer(adapted, *args[1:], **kwargs)
        return self.base_layer(*args, **{**kwargs, "hidden_states": adapted})

    def _with_adapted_residual(
        self, adapter_names: list[str], args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """The block's residual input r (its second argument, ``input_tensor``) replaced by ``r + Σ a(r)``."""
        if len(args) > 1:
            residual = args[1]
        elif "input_tensor" in kwargs:
            residual = kwargs["input_tensor"]
        else:
            raise TypeError(
                f"{type(self.base_layer).__name__} was called without the residual input that a parallel "
                "bottleneck adapter reads (its second argument, input_tensor)"
            )
        adapted = residual
        for name in adapter_names:
            adapted = adapted + self.adapter_delta(name, residual)
        if len(args) > 1:
            return (args[0], adapted, *args[2:]), kwargs
        return args, {**kwargs, "input_tensor": adapted}

    def __getattr__(self, name: str) -> Any:
        # a wrapped decoder layer keeps its attributes (transformers reads layer.attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith("__"):  # never the block's copy or pickle protocol
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        placements = {name: self.placement[name] for name in self.adapter_names}
        return f"{super().extra_repr()}, placement={placements}"
