"""The bottleneck adapter around one block of a model.

An adapter is a small network ``a(h) = dropout(scaling · up(act(down(h))))`` with ``down: d_in → m`` and
``up: m → d_out``, ``m = d_in // reduction_factor``. Where it reads and where it adds depends on its
placement at this block ``f``:

- ``after`` (Houlsby, Pfeiffer): ``y = f(x) + a(f(x))``, on the first element when ``f`` returns a tuple;
- ``beside`` (parallel): ``y = f(x) + a(x)``;
- ``beside_residual`` (parallel where ``f`` adds its own residual and normalises, as BERT's ``BertOutput``
  computes ``LayerNorm(dense(h) + r)``): ``y = f(h, r + a(r))``, which is ``LayerNorm(dense(h) + a(r) + r)``;
- ``beside_stream`` (parallel on pre-norm models, whose block reads ``x = norm(r)`` of the residual stream
  ``r``): ``y = f(x) + a(r)``, AdapterHub's parallel adapter; ``r`` is taken from the norm's input by a
  forward pre-hook on the norm (:meth:`BottleneckLayer.read_stream_at`);
- ``around_norm`` (sequential, reading the normalised residual sum, where ``f`` is the layer norm after a
  residual connection, as BERT's ``LayerNorm(dense(h) + r)``): ``y = f(s + a(f(s)))`` for its input ``s``,
  AdapterHub's ``original_ln_before=True``.

With ``up`` zero (the ``mam_adapter`` init) ``a`` is zero, so a new adapter leaves ``f`` unchanged.

Under a composition block (:mod:`peftkit.composition`) the adapters act on one state, as in AdapterHub:
``f(x)`` for ``after``, the residual input ``r`` for ``beside_residual``, the residual sum ``s`` for
``around_norm`` (then ``f`` of the result), ``f(x)`` read beside ``x`` for ``beside`` (beside ``r`` for
``beside_stream``). One adapter's step adds
its output to the state (``s ↦ s + a(f(s))`` around a norm), so ``Stack`` applies them in turn and
``Average`` weighs the states. ``Fuse`` adds an AdapterFusion layer's attention over the fused adapters'
outputs (:mod:`peftkit_bottleneck.fusion`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from peftkit import AdapterLayer
from peftkit.composition import BLOCK_NAMES, Child, CompositionBlock, Fuse, Stack, compose, fuse_blocks
from peftkit.errors import ConfigError
from peftkit.layer_access import LINEAR, LayerFeatures
from torch import nn

AFTER, BESIDE, BESIDE_RESIDUAL, AROUND_NORM = "after", "beside", "beside_residual", "around_norm"
BESIDE_STREAM = "beside_stream"
PLACEMENTS = (AFTER, BESIDE, BESIDE_RESIDUAL, BESIDE_STREAM, AROUND_NORM)
# the placements whose adapter reads what the block writes (the others read what it reads, or the stream)
READS_OUTPUT = (AFTER, AROUND_NORM)
# the placements whose adapter adds to the block's output beside it
BESIDE_OUTPUT = (BESIDE, BESIDE_STREAM)

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

    # adapter_fusion: AdapterFusion layers (peftkit_bottleneck.fusion), each an adapter of its own
    adapter_tensor_names = ("adapter_down", "adapter_up", "adapter_fusion")
    adapter_state_names = (
        "adapter_act",
        "adapter_dropout",
        "placement",
        "scaling",
        "reads_sum",
        "block_kind",
        "fusion_options",
    )
    supported_kinds = (LINEAR,)
    composition_blocks = BLOCK_NAMES
    # beside_stream: the norm whose input is the residual stream, and that input in the current forward
    _stream_norm: nn.Module | None = None
    _stream: torch.Tensor | None = None

    def __init__(self, base_layer: nn.Module, features: LayerFeatures) -> None:
        super().__init__(base_layer, features)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.adapter_fusion = nn.ModuleDict()
        self.placement: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        # original_ln_before: the adapter reads the block's output once joined to the residual stream
        self.reads_sum: dict[str, bool] = {}
        self.block_kind: dict[str, str | None] = {}
        self.fusion_options: dict[str, dict[str, bool]] = {}

    def update_layer(
        self,
        adapter_name: str,
        config: Any,
        module_name: str,
        placement: str = AFTER,
        block: str | None = None,
    ) -> None:
        """``block``: the config field that chose this block (``"attention_modules"``, ``"feedforward_modules"``
        or ``"cross_adapter"``), by which AdapterHub's files name its place."""
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        d_out = self.features.out_features
        if placement == BESIDE_STREAM and self._stream_norm is None:
            raise ValueError("a beside_stream adapter needs read_stream_at(norm) first")
        d_in = d_out if placement in READS_OUTPUT else self.features.in_features
        m = bottleneck_size(config, d_in)
        self.adapter_down[adapter_name] = nn.Linear(d_in, m)
        self.adapter_up[adapter_name] = nn.Linear(m, d_out)
        self.adapter_act[adapter_name] = ACTIVATIONS[config.non_linearity]()
        self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.placement[adapter_name] = placement
        self.scaling[adapter_name] = config.scaling
        self.reads_sum[adapter_name] = bool(config.reads_normalized_sum)
        self.block_kind[adapter_name] = block
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

    def read_stream_at(self, norm: nn.Module) -> None:
        """Read the residual stream for ``beside_stream`` adapters at ``norm``'s input: the layer norm whose
        output this block reads. A forward pre-hook on ``norm`` keeps its input until this block runs."""
        if self._stream_norm is norm:
            return
        if self._stream_norm is not None:
            raise ValueError(
                f"{type(self.base_layer).__name__} already reads the residual stream at another module"
            )
        object.__setattr__(self, "_stream_norm", norm)  # not a submodule: the model holds it elsewhere
        norm.register_forward_pre_hook(self._keep_stream, with_kwargs=True)

    def _keep_stream(self, norm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._stream = args[0] if args else next(iter(kwargs.values()))

    def _stop_reading_stream(self) -> None:
        norm = self._stream_norm
        if norm is None:
            return
        # found by owner, not by a kept handle: a deep copy's handle would point at the original's hooks
        for key, hook in list(norm._forward_pre_hooks.items()):
            if getattr(hook, "__self__", None) is self:
                del norm._forward_pre_hooks[key]
                norm._forward_pre_hooks_with_kwargs.pop(key, None)
        object.__setattr__(self, "_stream_norm", None)
        self._stream = None

    def _take_stream(self) -> torch.Tensor | None:
        """The residual stream kept for this call, let go of so no tensor outlives the forward."""
        stream, self._stream = self._stream, None
        return stream

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if BESIDE_STREAM not in self.placement.values():
            self._stop_reading_stream()

    def unloaded(self) -> nn.Module:
        self._stop_reading_stream()
        return super().unloaded()

    def add_fusion(self, fusion_name: str, config: Any, dropout_prob: float) -> None:
        """An AdapterFusion layer over adapters this block holds (:mod:`peftkit_bottleneck.fusion`)."""
        from peftkit_bottleneck.fusion import FusionLayer

        self.adapter_fusion[fusion_name] = FusionLayer(config, self.features.out_features, dropout_prob)
        self.fusion_options[fusion_name] = config.options()
        self._move_to_base(self.adapter_fusion[fusion_name])

    def adapter_delta(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``dropout(scaling · up(act(down(h))))``, computed in the adapter's dtype and cast back to h's."""
        return self.adapter_dropout[adapter_name](self._scaled_up(adapter_name, h)).to(h.dtype)

    def _scaled_up(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``scaling · up(act(down(h)))`` in the adapter's dtype: what a fusion attends over (undropped)."""
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        z = self.adapter_act[adapter_name](down(h.to(down.weight.dtype)))
        return up(z) * self.scaling[adapter_name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # blocks are called positionally (an MLP) or by keyword (Llama's self_attn(hidden_states=...)):
        # take the arguments as they come and find the block's input only when an adapter reads it
        stream = self._take_stream() if self._stream_norm is not None else None
        if self.active_composition is not None and not self.disabled:
            return self._composed_forward(self.active_composition, args, kwargs, stream)
        pending = [] if self.disabled else [name for name in self.active_adapters if name in self.placement]
        residual_names = [name for name in pending if self.placement[name] == BESIDE_RESIDUAL]
        if residual_names:
            args, kwargs = self._with_adapted_residual(residual_names, args, kwargs)
        result = self.base_layer(*args, **kwargs)
        norm_names = [name for name in pending if self.placement[name] == AROUND_NORM]
        if norm_names:
            result = self._around_norm(norm_names, result, args, kwargs)
        output_names = [name for name in pending if self.placement[name] in (AFTER, *BESIDE_OUTPUT)]
        if not output_names:
            return result
        h = result[0] if isinstance(result, tuple) else result
        reads = {AFTER: h}
        for placement in {self.placement[name] for name in output_names} - {AFTER}:
            reads[placement] = self._beside_input(placement, args, kwargs, stream)
        out = h
        for name in output_names:
            out = out + self.adapter_delta(name, reads[self.placement[name]])
        return (out, *result[1:]) if isinstance(result, tuple) else out

    def _beside_input(
        self, placement: str, args: tuple, kwargs: dict[str, Any], stream: torch.Tensor | None
    ) -> torch.Tensor:
        """What an adapter beside the block reads: the residual stream (``beside_stream``) or the block's input."""
        if placement == BESIDE:
            return self._block_input(args, kwargs)
        if stream is None:
            raise RuntimeError(
                f"a parallel bottleneck adapter on {type(self.base_layer).__name__} reads the residual stream at "
                f"the input of {type(self._stream_norm).__name__}, which did not run before it in this forward; "
                "the model calls its blocks in another order than its layout says (use BottleneckConfig("
                "parallel_input='block_input') to read the block's input instead)"
            )
        return stream

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
        adapted = self._block_input(args, kwargs)
        for name in adapter_names:
            adapted = adapted + self.adapter_delta(name, normed)
        return self._call_with_input(args, kwargs, adapted)

    def _with_adapted_residual(
        self, adapter_names: list[str], args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """The block's residual input r (its second argument, ``input_tensor``) replaced by ``r + Σ a(r)``."""
        residual = self._residual_input(args, kwargs)
        adapted = residual
        for name in adapter_names:
            adapted = adapted + self.adapter_delta(name, residual)
        return self._with_residual(args, kwargs, adapted)

    def _residual_input(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        if len(args) > 1:
            return args[1]
        if "input_tensor" in kwargs:
            return kwargs["input_tensor"]
        raise TypeError(
            f"{type(self.base_layer).__name__} was called without the residual input that a parallel "
            "bottleneck adapter reads (its second argument, input_tensor)"
        )

    @staticmethod
    def _with_residual(
        args: tuple, kwargs: dict[str, Any], residual: torch.Tensor
    ) -> tuple[tuple, dict[str, Any]]:
        if len(args) > 1:
            return (args[0], residual, *args[2:]), kwargs
        return args, {**kwargs, "input_tensor": residual}

    def _call_with_input(self, args: tuple, kwargs: dict[str, Any], x: torch.Tensor) -> Any:
        """The block called as it was, with ``x`` for its input."""
        if args:
            return self.base_layer(x, *args[1:], **kwargs)
        return self.base_layer(*args, **{**kwargs, "hidden_states": x})

    # --- composition blocks -------------------------------------------------------------------------------
    def check_composition(self, block: Child) -> None:
        held = [name for name in _names(block) if name in self.placement]
        placements = {self.placement[name] for name in held}
        if len(placements) > 1:
            raise ConfigError(
                f"bottleneck adapters {held} sit in one block with different placements ({sorted(placements)}), "
                "which one composition cannot combine; compose adapters of one style"
            )
        if placements & {BESIDE, BESIDE_STREAM, BESIDE_RESIDUAL}:
            if any(
                sum(1 for child in stack if set(_names(child)) & set(held)) > 1 for stack in _stacks(block)
            ):
                raise ConfigError(
                    f"Stack over parallel bottleneck adapters ({held}): each reads the block's input, not the "
                    "one before's output, so stacking has no meaning for them (AdapterHub 1.3 keeps only the "
                    "last part's output); use Average, or set_adapter([...]) to add them up"
                )
        for fuse in fuse_blocks(block):
            self._check_fuse(fuse)

    def _check_fuse(self, fuse: Fuse) -> None:
        held = [name for name in _names(fuse) if name in self.placement]
        if not held:
            return
        if fuse.name not in self.adapter_fusion:
            raise ConfigError(
                f"{fuse!r}: this block holds {held} but no fusion {fuse.name!r}; a fusion layer sits in the blocks "
                "where every fused adapter has one (add the fusion after the adapters)"
            )
        if any(not isinstance(child, str) and not all(isinstance(n, str) for n in child) for child in fuse):
            raise ConfigError(f"{fuse!r}: inside Fuse, a Stack may hold adapter names only")
        options = self.fusion_options[fuse.name]
        if self.reads_sum[held[0]]:
            for option in ("query_before_ln", "residual_before"):
                if options[option]:
                    raise ConfigError(
                        f"fusion {fuse.name!r} has {option}=True, which reads the block's output before it joins "
                        "the residual stream; adapters with original_ln_before=True (the pfeiffer default) see "
                        f"only the sum. Use {option}=False, or adapters with original_ln_before=False"
                    )

    def _composed_forward(
        self, block: Child, args: tuple, kwargs: dict[str, Any], stream: torch.Tensor | None = None
    ) -> Any:
        held = [name for name in _names(block) if name in self.placement]
        if not held:
            return self.base_layer(*args, **kwargs)
        placement = self.placement[held[0]]
        if placement == BESIDE_RESIDUAL:
            residual = self._residual_input(args, kwargs)
            (adapted,) = compose(block, (residual,), self._add_outputs_of(lambda r: r), where=self._where)
            args, kwargs = self._with_residual(args, kwargs, adapted)
            return self.base_layer(*args, **kwargs)
        if placement == AROUND_NORM:
            norm = functools.partial(self._call_with_input, args, kwargs)
            step = self._add_outputs_of(norm)
            state = (self._block_input(args, kwargs),)
            (adapted,) = compose(block, state, step, fuse=self._fuser(norm, step), where=self._where)
            return norm(adapted)
        result = self.base_layer(*args, **kwargs)
        h = result[0] if isinstance(result, tuple) else result
        if placement == AFTER:
            step = self._add_outputs_of(lambda state: state)
            (out,) = compose(
                block, (h,), step, fuse=self._fuser(lambda state: state, step), where=self._where
            )
        else:  # BESIDE, BESIDE_STREAM: each adapter reads what enters the block
            reads = self._beside_input(placement, args, kwargs, stream)
            out = compose(block, (reads, h), self._add_outputs_beside, where=self._where)[-1]
        return (out, *result[1:]) if isinstance(result, tuple) else out

    @property
    def _where(self) -> str:
        return f"a bottleneck block ({type(self.base_layer).__name__})"

    def _add_outputs_of(self, reads: Any) -> Any:
        """Sequential composition's step: the state plus each held adapter's output on ``reads(state)``."""

        def step(names: list[str], state: tuple) -> tuple:
            (current,) = state
            for name in names:
                if name in self.placement:
                    current = current + self.adapter_delta(name, reads(current))
            return (current,)

        return step

    def _add_outputs_beside(self, names: list[str], state: tuple) -> tuple:
        inputs, out = state
        for name in names:
            if name in self.placement:
                out = out + self.adapter_delta(name, inputs)
        return inputs, out

    def _fuser(self, reads: Any, step: Any) -> Any:
        """``Fuse`` here: the fusion's attention over each child's output on ``reads(state)``, added to the
        state; a child ``Stack`` runs its adapters but the last in turn, and the last one's output is fused."""

        def fuse(node: Fuse, state: tuple) -> tuple:
            (current,) = state
            if not any(name in self.placement for name in _names(node)):
                return state
            read = reads(current)
            outputs = []
            for child in node.children:
                names = [child] if isinstance(child, str) else list(child.children)
                if len(names) > 1:
                    outputs.append(self._scaled_up(names[-1], reads(step(names[:-1], (current,))[0])))
                else:
                    outputs.append(self._scaled_up(names[0], read))
            dtype = outputs[0].dtype
            fused = self.adapter_fusion[node.name](
                read.to(dtype), torch.stack(outputs, dim=-2), current.to(dtype)
            )
            return (fused.to(current.dtype),)

        return fuse

    def __getattr__(self, name: str) -> Any:
        # a wrapped decoder layer keeps its attributes (transformers reads layer.attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or name.startswith("__"):  # never the block's copy or pickle protocol
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        # adapter_names also lists the fusions (adapter_fusion), which have no placement of their own
        placements = {name: self.placement[name] for name in self.adapter_names if name in self.placement}
        fusions = f", fusions={list(self.adapter_fusion)}" if len(self.adapter_fusion) else ""
        return f"{super().extra_repr()}, placement={placements}{fusions}"


def _names(block: Child) -> list[str]:
    return [block] if isinstance(block, str) else block.flatten()


def _stacks(block: Child) -> list[Stack]:
    if not isinstance(block, CompositionBlock):
        return []
    own = [block] if isinstance(block, Stack) else []
    return own + [stack for child in block.children for stack in _stacks(child)]
