"""BitFitConfig: which biases (and LayerNorm weights) get a trained offset.

PEFT has no BitFit, so the fields follow PEFT's conventions for what they share with its other methods
(``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``,
``modules_to_save``, ``task_type``) and add one of BitFit's own, ``train_layer_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.config import PeftConfig, check_str_list, fail


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit: trains an offset ``Δb`` added to the bias of each targeted layer, nothing else.

    ``target_modules``: None (the default), every bias of the model, as the BitFit paper trains them:
    those of Linear, Conv and transformers ``Conv1D`` layers, LayerNorms (β), GroupNorms, BatchNorms and
    InstanceNorms; a bias in a module BitFit cannot offset is named in a warning. Or names or name
    suffixes, a regex matched against the full module path, or ``"all-linear"`` (the linear layers that
    have a bias); a module named explicitly must have a bias BitFit can offset.
    ``exclude_modules``: modules never to adapt, in the same forms.
    ``train_layer_norm``: also train offsets to the weight γ of every ``nn.LayerNorm`` in scope, and to
    its bias whatever ``target_modules`` says.
    A task head in ``modules_to_save`` (set by ``task_type``) trains in full instead, bias included, and
    gets no offset.
    """

    method: ClassVar[str] = "bitfit"

    peft_type: str = "BITFIT"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    train_layer_norm: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_str_list(self, "target_modules", allow_str=True)
        check_str_list(self, "exclude_modules", allow_str=True)
        if not isinstance(self.train_layer_norm, bool):
            raise fail(self, "train_layer_norm", self.train_layer_norm, "True or False")
        self._check_layers()

    def _check_layers(self) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            indices = [layers] if isinstance(layers, int) else layers
            if not isinstance(indices, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
            ):
                raise fail(
                    self, "layers_to_transform", layers, "None, a layer index or a list of layer indices"
                )
            if isinstance(self.target_modules, str):
                raise fail(self, "layers_to_transform", layers, "None when target_modules is a string")
        if self.layers_pattern is not None:
            check_str_list(self, "layers_pattern", allow_str=True)
            if layers is None:
                raise fail(
                    self, "layers_pattern", self.layers_pattern, "None unless layers_to_transform is set"
                )
