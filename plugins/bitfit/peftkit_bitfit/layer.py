"""BitFit's layers: per-adapter offsets added to a layer's existing bias (and a LayerNorm's weight).

    y = base(x) + Δb                                   Linear, Conv1d/2d/3d, transformers' Conv1D
    y = (x - μ) / √(σ² + ε) · (γ [+ Δγ]) + (β + Δβ)    nn.LayerNorm (Δγ with train_layer_norm)
    y = base(x) + Δβ                                   GroupNorm, BatchNorm, InstanceNorm (affine)

Each ``Δ`` has the shape of the tensor it offsets and starts at zero, so a new adapter is the identity.

Design. The trained tensors are offsets held by an :class:`peftkit.AdapterLayer` wrapped around each
adapted layer, not the base biases trained in place. That way the base model's tensors stay untouched
(``disable_adapter`` gives back the base model bitwise), several BitFit adapters live on one model and
switch like any others, the file holds only the offsets (``<path>.bitfit_bias``, ``<path>.bitfit_weight``),
and the core's save, load, delete, dtype casting and freezing work unchanged.

- A bias layer adds its offset to the base output, broadcast over the output channel: the last dimension
  for linear layers, the dimension before the spatial ones for convolutions and channel norms. The
  result keeps the base output's dtype, so a zero offset changes no bit.
- A LayerNorm's weight offset cannot be applied after the fact without recomputing the normalisation, so
  its layer calls ``F.layer_norm`` with ``γ + Δγ`` and ``β + Δβ`` rounded to the base dtype: exactly what
  the base LayerNorm computes once the offsets are merged, bit for bit. The core's layer hooks know no
  norm kind, so the plugin finds norms itself.
- Merging adds the offsets to the base tensors and unmerging subtracts them. The layers do it themselves
  (overriding :meth:`AdapterLayer.merge`): the core's merge would also read and rewrite the dense weight,
  which BitFit never changes, and which a norm's weight hooks cannot read at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peftkit import AdapterLayer
from peftkit.layer_access import CONV1D, CONV2D, CONV3D, LINEAR
from torch import nn

from peftkit_bitfit.config import BitFitConfig

# norms whose output is normalised · γ + β with β along the channel dimension (torch's own forwards only)
CHANNEL_NORMS = (
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_INSTANCE_NORM_SPATIAL_DIMS = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}


def has_bias(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "bias", None), torch.Tensor)


def is_layer_norm(layer: nn.Module) -> bool:
    """An affine nn.LayerNorm computing through nn.LayerNorm's own forward (F.layer_norm), which
    :class:`BitFitLayerNorm` recomputes with shifted tensors."""
    return (
        isinstance(layer, nn.LayerNorm)
        and type(layer).forward is nn.LayerNorm.forward
        and layer.elementwise_affine
    )


def is_channel_norm(layer: nn.Module) -> bool:
    """An affine GroupNorm, BatchNorm or InstanceNorm with torch's own forward (a subclass may lay its
    channels out otherwise); lazy ones have no shapes yet."""
    return (
        isinstance(layer, CHANNEL_NORMS)
        and not isinstance(layer, nn.modules.lazy.LazyModuleMixin)
        and any(type(layer).forward is kind.forward for kind in CHANNEL_NORMS)
        and bool(layer.affine)
    )


class _OffsetLayer(AdapterLayer):
    """Offsets to named tensors of the base layer; ``offset_of`` maps each container to the tensor it shifts."""

    offset_of: ClassVar[dict[str, str]] = {}

    def _add_offsets(self, adapter_name: str, containers: Iterable[str]) -> None:
        """Zero offsets in ``containers`` for those of their tensors the base layer has."""
        base = self.get_base_layer()
        created = []
        for container in containers:
            tensor = getattr(base, self.offset_of[container], None)
            if isinstance(tensor, torch.Tensor):
                created.append(nn.Parameter(torch.zeros(tensor.shape)))
                getattr(self, container)[adapter_name] = created[-1]
        self._move_to_base(*created, float_dtype=torch.float32)

    def _shifted(self, tensor_name: str, adapter_names: list[str]) -> torch.Tensor | None:
        """A base tensor plus the offsets of ``adapter_names``, in the base tensor's dtype."""
        tensor = getattr(self.get_base_layer(), tensor_name)
        if tensor is None:
            return None
        container = getattr(self, self._container_for(tensor_name))
        shifted = tensor
        for name in adapter_names:
            if name in container:
                shifted = shifted + container[name]
        return shifted.to(tensor.dtype)

    def _container_for(self, tensor_name: str) -> str:
        return next(c for c, t in self.offset_of.items() if t == tensor_name)

    def _write(self, tensor_name: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            getattr(self.get_base_layer(), tensor_name).copy_(value)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        for name in names:
            if name in self.merged_adapters or not self.holds(name):
                continue
            merged = {
                tensor_name: self._shifted(tensor_name, [name]).detach()
                for container, tensor_name in self.offset_of.items()
                if name in getattr(self, container)
            }
            if safe_merge and not all(torch.isfinite(value).all() for value in merged.values()):
                raise ValueError(f"merging BitFit adapter {name!r} gives NaN or inf biases")
            for tensor_name, value in merged.items():
                self._write(tensor_name, value)
            self.merged_adapters.append(name)

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Subtract merged offsets again, last merged first."""
        base = self.get_base_layer()
        for name in reversed(list(self.merged_adapters)):
            if adapter_names is not None and name not in adapter_names:
                continue
            for container, tensor_name in self.offset_of.items():
                offsets = getattr(self, container)
                if name in offsets:
                    tensor = getattr(base, tensor_name)
                    self._write(tensor_name, (tensor - offsets[name].detach()).to(tensor.dtype))
            self.merged_adapters.remove(name)


class BitFitLayer(_OffsetLayer):
    """A Linear, Conv or transformers Conv1D layer with a bias, plus offsets ``bitfit_bias`` to that bias."""

    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("bitfit_bias",)
    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR, CONV1D, CONV2D, CONV3D)
    offset_of: ClassVar[dict[str, str]] = {"bitfit_bias": "bias"}

    def __init__(self, base_layer: nn.Module, features: Any = None) -> None:
        super().__init__(base_layer, features)
        self.bitfit_bias = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: BitFitConfig, module_name: str) -> None:
        self._add_offsets(adapter_name, ["bitfit_bias"])

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        # the channel dimension comes before the spatial ones (none for linear layers)
        spatial = (1,) * len(self.features.kernel_size)
        shifted = result
        for name in adapter_names:
            offset = self.bitfit_bias[name]
            shifted = shifted + offset.view(offset.shape + spatial)
        return shifted.to(result.dtype)


class BitFitChannelNorm(_OffsetLayer):
    """An affine GroupNorm, BatchNorm or InstanceNorm plus offsets ``bitfit_bias`` to its bias β.

    β enters the output as a last step, added along the channel dimension, so the offset is added to the
    base output there; running statistics are the base layer's and stay its own.
    """

    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("bitfit_bias",)
    offset_of: ClassVar[dict[str, str]] = {"bitfit_bias": "bias"}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        norm = self.get_base_layer()
        # an instance norm also takes unbatched input (channels first); the others always have a batch
        self.instance_spatial_dims = next(
            (dims for kind, dims in _INSTANCE_NORM_SPATIAL_DIMS.items() if isinstance(norm, kind)), None
        )

    def update_layer(self, adapter_name: str, config: BitFitConfig, module_name: str) -> None:
        self._add_offsets(adapter_name, ["bitfit_bias"])

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        channel = 1 if self.instance_spatial_dims is None else result.dim() - self.instance_spatial_dims - 1
        shape = [1] * result.dim()
        shape[channel] = -1
        shifted = result
        for name in adapter_names:
            shifted = shifted + self.bitfit_bias[name].view(shape)
        return shifted.to(result.dtype)


class BitFitLayerNorm(_OffsetLayer):
    """An ``nn.LayerNorm`` plus offsets ``bitfit_bias`` to its bias β and, for adapters made with
    ``train_layer_norm=True``, ``bitfit_weight`` to its weight γ."""

    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("bitfit_weight", "bitfit_bias")
    offset_of: ClassVar[dict[str, str]] = {"bitfit_weight": "weight", "bitfit_bias": "bias"}

    def __init__(self, base_layer: nn.LayerNorm) -> None:
        super().__init__(base_layer)
        self.bitfit_weight = nn.ParameterDict()
        self.bitfit_bias = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: BitFitConfig, module_name: str) -> None:
        self._add_offsets(
            adapter_name, ["bitfit_weight", "bitfit_bias"] if config.train_layer_norm else ["bitfit_bias"]
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        pending = [name for name in self.active_adapters if name not in self.merged_adapters]
        if self.disabled or self.row_adapters is not None or not pending:
            return super().forward(x, *args, **kwargs)
        return self.adapter_output(x, x, pending)

    def adapter_output(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """The normalisation recomputed with the shifted tensors (``result``, the base output, is not used)."""
        norm = self.get_base_layer()
        weight, bias = self._shifted("weight", adapter_names), self._shifted("bias", adapter_names)
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
