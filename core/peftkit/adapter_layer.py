"""The base of every layer a method wraps: adapters keyed by name, activation, merging, state."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from peftkit import exact_unmerge, plugins
from peftkit.composition import Child, Split, compose
from peftkit.errors import ConfigError, MergeNotSupportedError
from peftkit.layer_access import LayerFeatures
from peftkit.mixed_batch import RowAdapters


class AdapterLayer(nn.Module):
    """A base layer plus one method's adapters, each under its adapter name.

    A method subclasses this and says only its math:

    - ``adapter_tensor_names``: the attributes (``nn.ModuleDict`` or ``nn.ParameterDict`` keyed by
      adapter name) that hold the adapter's trained tensors; they are what trains, saves and loads.
    - ``adapter_state_names``: other per-adapter attributes (dicts, dropout modules), cleared on delete.
    - :meth:`update_layer` creates an adapter; :meth:`adapter_output` adds the active, unmerged
      adapters to the base output; :meth:`delta_weight` (additive methods) or :meth:`merged_weight`
      and :meth:`unmerged_weight` (others) say how the adapter folds into the dense weight;
      :meth:`merged_bias` and :meth:`unmerged_bias` say how it changes the base layer's bias, if at all.
    - :meth:`saved_tensors`: what the adapter's file holds for this layer, when not its tensors as
      they are (AdaLoRA saves its factors cut to the ranks it kept); :meth:`tensor_to_load` the other
      way, where a layer holds a saved tensor in another shape (LoRA padded for compiled hot-swaps).
    - ``composition_blocks``: the composition blocks (:mod:`peftkit.composition`) the layer computes, by
      default ``("Stack",)``, which any layer computes by running all of a stack's adapters as active ones.
      A layer that routes its forward through :meth:`forward` (or hands compositions to it) and whose
      adapters act on each token separately computes every block but ``Fuse`` with :meth:`composed_output`'s
      default, and says so with ``composition_blocks = peftkit.composition.TOKEN_WISE_BLOCKS``.
    - ``supported_kinds``: the base layer kinds (see :mod:`peftkit.layer_access`) it can wrap.
    - ``hotswap_fields``: the config fields that may differ when another saved adapter is hot-swapped
      in (:func:`peftkit.hotswap_adapter`) because they change only scalars, which
      :meth:`update_scalars` then sets; every other field must match. :meth:`hotswap_fields_of` may widen
      them for one adapter.
    """

    adapter_tensor_names: ClassVar[tuple[str, ...]] = ()
    adapter_state_names: ClassVar[tuple[str, ...]] = ()
    supported_kinds: ClassVar[tuple[str, ...]] = ()
    composition_blocks: ClassVar[tuple[str, ...]] = ("Stack",)
    hotswap_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module, features: LayerFeatures | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.features = features if features is not None else plugins.layer_features(self.get_base_layer())
        plugins.prepare_base_layer(self.get_base_layer())
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.merge_residuals: dict[str, exact_unmerge.MergeResidual] = {}
        self.row_adapters: RowAdapters | None = None  # set while a mixed batch runs (peftkit.mixed_batch)
        self.active_composition: Child | None = None  # a composition block, set by PeftModel.set_adapter
        self.disabled = False

    # --- what a method implements ---------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: Any, module_name: str) -> None:
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise MergeNotSupportedError(f"{type(self).__name__} adapters cannot be merged into the base weight")

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight(adapter_name).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight(adapter_name).to(weight.dtype)

    def merged_bias(self, adapter_name: str, bias: torch.Tensor) -> torch.Tensor | None:
        """The base layer's bias once the adapter is merged; None (the default) leaves the bias alone."""
        return None

    def unmerged_bias(self, adapter_name: str, bias: torch.Tensor) -> torch.Tensor | None:
        """The bias with the merged adapter taken out again; None (the default) leaves the bias alone."""
        return None

    def update_scalars(self, adapter_name: str, config: Any, module_name: str) -> None:
        """After a hot-swap, set what the ``hotswap_fields`` of the new ``config`` decide for this layer
        (``module_name``: its path in the base model, as :meth:`update_layer` gets it). Default: nothing."""

    def hotswap_fields_of(self, adapter_name: str) -> tuple[str, ...]:
        """The config fields that may differ when another adapter is hot-swapped into ``adapter_name``
        (default: ``hotswap_fields``; LoRA adds the rank once the adapter is padded to a target rank)."""
        return self.hotswap_fields

    def tensor_to_load(self, adapter_name: str, name: str, saved: torch.Tensor) -> torch.Tensor:
        """A saved tensor (``name`` as :meth:`saved_tensors` names it) in the shape this layer holds it; the
        loader then checks the shape and copies. Default: as saved."""
        return saved

    def saved_tensors(self, adapter_name: str) -> list[tuple[str, torch.Tensor]]:
        """The tensors saved for this layer, named relative to it (default: :meth:`adapter_parameters`).

        Called on every adapter layer of the model: return ``[]`` where the layer does not hold the adapter.
        """
        return self.adapter_parameters(adapter_name)

    # --- shared machinery -----------------------------------------------------------------------
    def get_base_layer(self) -> nn.Module:
        """The innermost wrapped layer (methods may stack: a LoRA layer around an IA3 layer)."""
        layer = self.base_layer
        while isinstance(layer, AdapterLayer):
            layer = layer.base_layer
        return layer

    # Models read their layers' tensors directly (T5 checks ``self.wo.weight.dtype``), as through PEFT's layers.
    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def adapter_names(self) -> list[str]:
        # every container: an adapter may hold tensors in some only (LoRA on an embedding: lora_embedding_*)
        names: list[str] = []
        for container_name in self.adapter_tensor_names:
            names += [name for name in getattr(self, container_name).keys() if name not in names]
        return names

    def holds(self, adapter_name: str) -> bool:
        return any(adapter_name in getattr(self, name) for name in self.adapter_tensor_names)

    def set_active(self, adapter_names: list[str]) -> None:
        self.active_adapters = [name for name in adapter_names if self.holds(name)]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            self.row_adapters.check_rows(x.shape[0], type(self).__name__)
            return self.mixed_batch_output(x, result, self.row_adapters)
        if self.active_composition is not None:
            return self.composed_output(x, result, self.active_composition)
        pending = [name for name in self.active_adapters if name not in self.merged_adapters]
        if not pending:
            return result
        return self.adapter_output(x, result, pending)

    def mixed_batch_output(self, x: torch.Tensor, result: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """Each row plus its own adapter's output. This default runs :meth:`adapter_output` once per
        adapter on that adapter's rows; a method can override it to do all rows at once."""
        out = result
        for name in rows.adapters():
            if not self.holds(name):
                continue
            selected = torch.tensor([row_name == name for row_name in rows.names], device=x.device)
            changed = self.adapter_output(x[selected], result[selected], [name])
            out = out.index_put((selected,), changed.to(out.dtype))
        return out

    def composed_output(self, x: torch.Tensor, result: torch.Tensor, block: Child) -> torch.Tensor:
        """The output under a composition block (:mod:`peftkit.composition`).

        This default suits layers whose adapters act on each token separately: the state is (input, output)
        and one adapter's step is :meth:`adapter_output`, so ``Stack`` applies adapters in turn, ``Average``
        weighs their outputs, ``Split`` and row blocks run each part on its own, and a row block of plain
        adapter names takes the layer's mixed-batch path. A method overrides it where its adapters read or
        write something else (bottleneck adapters), or to fuse.
        """

        def step(
            names: list[str], state: tuple[torch.Tensor, torch.Tensor]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            held = [name for name in names if self.holds(name)]
            return (state[0], self.adapter_output(state[0], state[1], held)) if held else state

        def rows_of_names(rows: RowAdapters, state: tuple[torch.Tensor, torch.Tensor]) -> tuple:
            return state[0], self.mixed_batch_output(state[0], state[1], rows)

        return compose(
            block, (x, result), step, rows_of_names=rows_of_names, holds=self.holds, where=type(self).__name__
        )[-1]

    def check_composition(self, block: Child) -> None:
        """Raise :class:`peftkit.ConfigError` where this layer cannot compute ``block`` as its adapters are
        configured (called by ``set_adapter`` on every layer before anything changes). Default: any block
        but a ``Split`` of adapters on a convolution, whose input's dimension 1 holds channels, not tokens."""
        if getattr(self.features, "kind", None) not in ("conv1d", "conv2d", "conv3d"):
            return

        def in_splits(node: Child) -> list[str]:
            if isinstance(node, str):
                return []
            return (node.flatten() if isinstance(node, Split) else []) + [
                name for child in node.children for name in in_splits(child)
            ]

        held = sorted({name for name in in_splits(block) if self.holds(name)})
        if held:
            raise ConfigError(
                f"Split splits sequences, and {type(self).__name__} wraps a {self.features.kind} layer, "
                f"whose input has channels where Split expects tokens; adapters {held} are on it, so they "
                "cannot go inside Split"
            )

    def adapter_parameters(self, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
        """The adapter's tensors here, named as PEFT saves them relative to this layer."""
        out = []
        for container_name in self.adapter_tensor_names:
            container = getattr(self, container_name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                out.append((container_name, item))
            else:
                out.extend((f"{container_name}.{name}", p) for name, p in item.named_parameters())
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            self.unmerge([adapter_name])
        for container_name in self.adapter_tensor_names + self.adapter_state_names:
            container = getattr(self, container_name)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        base = self.get_base_layer()
        for name in names:
            if name in self.merged_adapters or not self.holds(name):
                continue
            weight = self.read_merge_target()
            merged = self.merged_weight(name, weight)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"merging adapter {name!r} into {type(base).__name__} gives NaN or inf weights"
                )
            new_bias = self._changed_bias(base, self.merged_bias, name)
            if self._keeps_residual(weight):  # before the write: ``weight`` may share its storage
                unmerged = self.unmerged_weight(name, merged)
                self.merge_residuals[name] = exact_unmerge.residual(weight, unmerged, version=0)
            self.write_merge_target(merged)
            self._note_own_write()
            if new_bias is not None:
                self._write_bias(base, new_bias)
            self.merged_adapters.append(name)

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Take merged adapters out again, last merged first."""
        base = self.get_base_layer()
        for name in reversed(list(self.merged_adapters)):
            if adapter_names is not None and name not in adapter_names:
                continue
            new_bias = self._changed_bias(base, self.unmerged_bias, name)
            unmerged = self.unmerged_weight(name, self.read_merge_target())
            kept = self.merge_residuals.pop(name, None)
            if kept is not None and kept.version == self.stored_merge_target()._version:
                unmerged = exact_unmerge.restore(unmerged, kept)
            self.write_merge_target(unmerged)
            self._note_own_write()
            if new_bias is not None:
                self._write_bias(base, new_bias)
            self.merged_adapters.remove(name)

    # What merging writes into: the base layer's dense weight, as the layer hooks read and write it. A
    # layer that adapts another tensor of its module (LoRA's target_parameters) overrides these three.
    def read_merge_target(self) -> torch.Tensor:
        return plugins.read_weight(self.get_base_layer())

    def write_merge_target(self, value: torch.Tensor) -> None:
        plugins.write_weight(self.get_base_layer(), value)

    def stored_merge_target(self) -> torch.Tensor | None:
        """The tensor as the module stores it (a quantized one for a 4-bit layer), whose version tells
        whether anything else wrote to it while merged."""
        stored = getattr(self.get_base_layer(), "weight", None)
        return stored if isinstance(stored, torch.Tensor) else None

    def _note_own_write(self) -> None:
        """Residuals stay valid through this layer's own writes; any other change to the weight (an
        optimizer step while merged) bumps its version and makes unmerging fall back to plain arithmetic."""
        for kept in self.merge_residuals.values():
            kept.version = self.stored_merge_target()._version

    def _keeps_residual(self, weight: torch.Tensor) -> bool:
        """Whether unmerging can restore this weight bit for bit (see :mod:`peftkit.exact_unmerge`): a
        dense 16- or 32-bit float weight, stored as read (a quantized layer is requantized instead)."""
        stored = self.stored_merge_target()
        return (
            stored is not None
            and exact_unmerge.supports(weight)
            and weight.dtype == stored.dtype
            and weight.numel() == stored.numel()
        )

    @staticmethod
    def _changed_bias(base: nn.Module, rule: Any, adapter_name: str) -> torch.Tensor | None:
        bias = getattr(base, "bias", None)
        if not isinstance(bias, torch.Tensor):
            return None
        return rule(adapter_name, bias.detach())

    @staticmethod
    def _write_bias(base: nn.Module, bias: torch.Tensor) -> None:
        with torch.no_grad():
            base.bias.copy_(bias.to(base.bias.dtype))

    def merge_covers(self, other: AdapterLayer) -> bool:
        """Whether merging this layer's adapters leaves ``other`` (a layer around a module that shares this
        layer's weight, as a tied output head does) computing what it computed unmerged. Default False:
        the model then warns that merging changes the tied module."""
        return False

    def unloaded(self) -> nn.Module:
        """The module that replaces this one when the model is unloaded."""
        return self.base_layer

    def _move_to_base(self, *modules_or_params: Any, float_dtype: torch.dtype | None = None) -> None:
        """Put new adapter tensors on the base weight's device; float dtype as asked (fp32 by default)."""
        reference = next(self.get_base_layer().parameters(), None)
        device = reference.device if reference is not None else torch.device("cpu")
        for item in modules_or_params:
            if isinstance(item, nn.Parameter):
                item.data = item.data.to(device=device, dtype=float_dtype or item.dtype)
            else:
                item.to(device=device, dtype=float_dtype)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Every adapter layer in a model, outermost first, with its path."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, AdapterLayer)]
