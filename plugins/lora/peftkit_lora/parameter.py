"""LoRA on a parameter (``LoraConfig.target_parameters``): W' = W + scaling · B_e A_e for each expert e.

A fused mixture-of-experts tensor ``(experts, d1, d2)`` is no ``nn.Linear``: the model indexes it inside its
own forward. So the layer computes the adapted tensor once per call and lets the wrapped module run with it
in the parameter's place (``torch.func.functional_call``); the module's code is not touched.

Layout and key names follow PEFT's ``lora.ParamWrapper``:

- a 3-D parameter is ``(experts, out, in)`` (transformers' ``F.linear(x, W[e])``), or ``(experts, in, out)``
  where the module says ``is_transposed = True``; a 2-D one is ``(out, in)``, one expert;
- ``lora_A`` is an ``nn.Linear(in, r · experts)``: its rows are expert-major, expert e owns rows e·r … e·r+r-1;
- ``lora_B`` is an ``nn.Linear(r · experts, out)``: its columns are rank-major, expert e owns columns
  e, e+experts, e+2·experts, …;
- one layer adapts one parameter; a second parameter of the same module gets a layer around the first,
  so its tensors are saved under ``<module>.lora_A.weight`` and the inner one's under
  ``<module>.base_layer.lora_A.weight``.

Dropout, DoRA, ``fan_in_fan_out`` and ``lora_bias`` cannot apply to a parameter (x is never in reach of the
adapter), nor can mixed batches: the config and the layer refuse them, as PEFT does.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from peftkit import AdapterLayer
from torch import nn

from peftkit_lora.config import LoraConfig


class ParameterLoraLayer(AdapterLayer):
    """LoRA on the parameter ``parameter_name`` of the module it wraps (innermost base layer)."""

    adapter_tensor_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")
    adapter_state_names: ClassVar[tuple[str, ...]] = ("r", "lora_alpha", "scaling")

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        self.parameter_name = parameter_name
        super().__init__(base_layer, features=None)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        # how many parameter layers wrap this one: its saved keys carry one ``base_layer.`` for each
        self.nesting = 0
        shape = self.parameter().shape
        if len(shape) not in (2, 3):
            raise ValueError(
                f"target_parameters: {type(self.get_base_layer()).__name__}.{parameter_name} has shape "
                f"{tuple(shape)}; LoRA adapts 2-D (out, in) and 3-D (experts, …, …) parameters only"
            )
        self.transposed = len(shape) == 3 and bool(getattr(self.get_base_layer(), "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        if len(shape) == 2 or not self.transposed:
            self.out_features, self.in_features = shape[-2], shape[-1]
        else:
            self.in_features, self.out_features = shape[-2], shape[-1]

    def parameter(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.parameter_name)

    # --- creating -------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        """``module_name``: the parameter's path in the base model (``…experts.gate_up_proj``), which
        ``rank_pattern`` and ``alpha_pattern`` are matched against, as in PEFT."""
        from peftkit_lora.layer import pattern_value

        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = alpha / (math.sqrt(r) if config.use_rslora else r)
        rank_rows = r * self.num_experts
        self.lora_A[adapter_name] = nn.Linear(self.in_features, rank_rows, bias=False)
        self.lora_B[adapter_name] = nn.Linear(rank_rows, self.out_features, bias=False)
        self._move_to_base(self.lora_A[adapter_name], self.lora_B[adapter_name], float_dtype=torch.float32)
        init = config.init_lora_weights
        if init is not False:  # False keeps nn.Linear's random init: a non-identity adapter, as in PEFT
            a = self.lora_A[adapter_name].weight
            if init is True:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            else:  # "gaussian"
                nn.init.normal_(a, std=1 / r)
            nn.init.zeros_(self.lora_B[adapter_name].weight)

    # --- the math -------------------------------------------------------------------------------
    def _expert_factors(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per expert, the left and right factors of ΔW_e in the parameter's own layout:
        (B_e, A_e) for ``(experts, out, in)``, (A_eᵀ, B_eᵀ) for ``(experts, in, out)``."""
        experts = self.num_experts
        a = self.lora_A[adapter_name].weight  # (r·E, in), expert-major rows
        b = self.lora_B[adapter_name].weight  # (out, r·E), rank-major columns
        a = a.reshape(experts, -1, a.shape[-1])  # (E, r, in)
        b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
        if self.transposed:
            return a.transpose(1, 2).to(dtype), b.transpose(1, 2).to(dtype)
        return b.to(dtype), a.to(dtype)

    def _as_experts(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor

    def _like_parameter(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.squeeze(0) if self.parameter().dim() == 2 else tensor

    def adapted(self, weight: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """W + Σ scaling · ΔW, one ``baddbmm`` per adapter, in W's dtype (autocast off: the model reads a
        parameter of the dtype it stored)."""
        out = self._as_experts(weight)
        with torch.autocast(device_type=weight.device.type, enabled=False):
            for name in adapter_names:
                left, right = self._expert_factors(name, weight.dtype)
                out = torch.baddbmm(out, left, right, alpha=self.scaling[name])
        return self._like_parameter(out)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        left, right = self._expert_factors(adapter_name, torch.float32)
        return self._like_parameter(torch.bmm(left, right) * self.scaling[adapter_name])

    # --- the forward pass -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            held = [name for name in self.row_adapters.adapters() if self.holds(name)]
            if held:
                raise ValueError(
                    f"adapter {held[0]!r} adapts the parameter {self.parameter_name!r} (LoraConfig."
                    "target_parameters), which cannot differ from row to row of a batch (PEFT does not "
                    "support mixed batches there either): run its rows as a batch of their own"
                )
            return self.base_layer(x, *args, **kwargs)
        pending = [name for name in self.active_adapters if name not in self.merged_adapters]
        if not pending:
            return self.base_layer(x, *args, **kwargs)
        weight = self.adapted(self.parameter(), pending)
        # the parameter's path from self.base_layer, through any parameter layers nested inside this one
        path = "base_layer." * self._depth_below() + self.parameter_name
        return torch.func.functional_call(
            self.base_layer, {path: weight}, (x, *args), kwargs, tie_weights=False, strict=False
        )

    def _depth_below(self) -> int:
        depth, layer = 0, self.base_layer
        while isinstance(layer, AdapterLayer):
            depth, layer = depth + 1, layer.base_layer
        return depth

    # --- merging: into the parameter, exactly undone (the core's merge, pointed at the parameter) --------
    def read_merge_target(self) -> torch.Tensor:
        return self.parameter().detach()

    def write_merge_target(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.parameter().copy_(value)

    def stored_merge_target(self) -> torch.Tensor:
        return self.parameter()

    # --- saving ---------------------------------------------------------------------------------
    def adapter_parameters(self, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
        """Named as PEFT saves them: ``base_layer.`` once for each parameter layer around this one."""
        prefix = "base_layer." * self.nesting
        return [(prefix + name, tensor) for name, tensor in super().adapter_parameters(adapter_name)]

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, {super().extra_repr()}"


def parameter_layers(module: nn.Module) -> list[ParameterLoraLayer]:
    """The parameter layers stacked at one place in the model, outermost first."""
    out = []
    while isinstance(module, AdapterLayer):
        if isinstance(module, ParameterLoraLayer):
            out.append(module)
        module = module.base_layer
    return out


def _matches(key: str, names: list[str]) -> bool:
    """PEFT's rule: the parameter's full name, or a suffix of it after a dot."""
    return key in names or any(key.endswith("." + name) for name in names)


def find_target_parameters(model: nn.Module, names: list[str]) -> list[tuple[str, str]]:
    """``(module path, parameter name)`` of every parameter ``names`` selects, in module order, and within
    a module in the order its parameters were registered (which decides the nesting, as in PEFT)."""
    from peftkit.injection import candidate_modules, logical_path

    found = []
    for path, module in candidate_modules(model):
        owner = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        for name, _ in owner.named_parameters(recurse=False):
            if _matches(f"{logical_path(path)}.{name}", names):
                found.append((path, name))
    return found


def check_same_parameters(peft_model: Any, config: LoraConfig, adapter_name: str) -> None:
    """PEFT's rule: adapters on parameters must all target the same ones, since which parameter a saved
    tensor belongs to is told by its place in the nesting."""
    for other_name, other in peft_model.peft_config.items():
        theirs = getattr(other, "target_parameters", None)
        if other_name == adapter_name or not theirs:
            continue
        if set(theirs) != set(config.target_parameters):
            raise ValueError(
                f"LoraConfig.target_parameters={sorted(config.target_parameters)!r} of adapter "
                f"{adapter_name!r} differs from {sorted(theirs)!r} of adapter {other_name!r}: adapters on "
                "parameters must all target the same parameters"
            )


def inject_into_parameters(peft_model: Any, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap each targeted parameter's module in a :class:`ParameterLoraLayer` (around the ones already there
    for its other parameters) and add the adapter; returns the parameters' paths."""
    from peftkit.errors import TargetModulesError
    from peftkit.injection import logical_path

    check_same_parameters(peft_model, config, adapter_name)
    model = peft_model.base_model.model
    keys = []
    for path, name in find_target_parameters(model, config.target_parameters):
        module = model.get_submodule(path)
        stacked = parameter_layers(module)
        others = [layer for layer in _adapter_stack(module) if not isinstance(layer, ParameterLoraLayer)]
        if others:
            raise TargetModulesError(
                f"LoraConfig.target_parameters selects {logical_path(path)}.{name}, but module "
                f"{logical_path(path)!r} is already adapted as a module ({type(others[0]).__name__}); "
                "do not target it with target_modules too"
            )
        layer = next((layer for layer in stacked if layer.parameter_name == name), None)
        training = module.training
        if layer is None:
            for inner in stacked:
                inner.nesting += 1
            layer = ParameterLoraLayer(module, name)
            model.set_submodule(path, layer)
        key = f"{logical_path(path)}.{name}"
        layer.update_layer(adapter_name, config, key)
        layer.train(training)
        keys.append(key)
    return keys


def _adapter_stack(module: nn.Module) -> list[AdapterLayer]:
    out = []
    while isinstance(module, AdapterLayer):
        out.append(module)
        module = module.base_layer
    return out
