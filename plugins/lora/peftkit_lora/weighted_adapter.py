"""``add_weighted_adapter``: a new LoRA adapter made from several, with PEFT's name, arguments and rules.

Per adapted layer, with sᵢ each adapter's scaling and wᵢ its weight (the new adapter's scaling is 1):

- ``cat``: A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...], so ΔW = Σ wᵢ ΔWᵢ exactly, at rank Σ rᵢ.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A's and the B's are
  combined separately (:mod:`peftkit_lora.task_arithmetic`), each scaled by √|wᵢsᵢ| (the sign on A);
  all adapters need the same rank. Cheap, and only an approximation of Σ wᵢ ΔWᵢ.
- ``svd`` and the ``*_svd`` variants: the dense ΔWᵢ are combined, then cut back to rank ``svd_rank``
  (default: the largest rᵢ) by a truncated SVD, ΔW ≈ (U S) Vᵀ, B = U S, A = Vᵀ.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peftkit import AdapterNameError, ConfigError
from peftkit.layer_access import CONV1D, CONV2D, CONV3D, EMBEDDING

from peftkit_lora import task_arithmetic
from peftkit_lora.config import LoraConfig
from peftkit_lora.layer import LoraLayer

FACTOR_WISE = task_arithmetic.KINDS  # combine A's and B's
SVD = ("svd",) + tuple(f"{kind}_svd" for kind in FACTOR_WISE if kind != "linear")
COMBINATION_TYPES = ("cat",) + FACTOR_WISE + SVD
NEEDS_DENSITY = ("magnitude_prune", "ties", "dare_linear", "dare_ties")


def add_weighted_adapter(
    peft_model: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name``, a combination of the LoRA ``adapters`` with ``weights`` (not activated)."""
    configs = _check(
        peft_model, adapters, weights, adapter_name, combination_type, density, majority_sign_method
    )
    if len(adapters) == 1:
        combination_type = "linear"  # any rule reduces to this for one adapter, as in PEFT
    base_kind = combination_type.removesuffix("_svd") if combination_type != "svd" else "linear"
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    if combination_type in FACTOR_WISE and len(set(ranks)) > 1:
        raise ConfigError(
            f"combination_type={combination_type!r} needs adapters of one rank, but {dict(zip(adapters, ranks))} "
            "differ; use 'cat' or 'svd'"
        )
    new_rank = sum(ranks) if combination_type == "cat" else ranks[0]
    if combination_type in SVD:
        new_rank = svd_rank or max(ranks)
    peft_model.add_adapter(adapter_name, _combined_config(configs, new_rank))
    rule = dict(density=1.0 if density is None else density, majority_sign_method=majority_sign_method)
    for _, layer in peft_model.adapter_layers():
        if not isinstance(layer, LoraLayer) or not layer.holds(adapter_name):
            continue
        present = [(name, w) for name, w in zip(adapters, weights) if layer.holds(name)]
        if not present:
            continue
        if combination_type == "cat":
            a, b = _cat(layer, present)
        elif combination_type in FACTOR_WISE:
            a, b = _factor_wise(layer, present, combination_type, rule)
        else:
            svd = dict(clamp=svd_clamp, full_matrices=svd_full_matrices, driver=svd_driver)
            a, b = _svd(layer, present, base_kind, rule, new_rank, svd)
        _write(layer, adapter_name, a, b)


def _check(peft_model, adapters, weights, adapter_name, combination_type, density, sign_method):
    if adapter_name in peft_model.peft_config:
        raise AdapterNameError(f"this model already has an adapter named {adapter_name!r}; pick a new name")
    if not adapters:
        raise ConfigError("add_weighted_adapter needs at least one adapter name in 'adapters'")
    if len(weights) != len(adapters):
        raise ConfigError(f"'weights' has {len(weights)} entries but 'adapters' names {len(adapters)}")
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(
            f"combination_type must be one of {', '.join(COMBINATION_TYPES)}, got {combination_type!r}"
        )
    if combination_type.removesuffix("_svd") in NEEDS_DENSITY and (density is None or not 0 < density <= 1):
        raise ConfigError(f"combination_type={combination_type!r} needs density in (0, 1], got {density!r}")
    if sign_method not in task_arithmetic.SIGN_METHODS:
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    configs = []
    for name in adapters:
        config = peft_model.peft_config.get(name)
        if config is None:
            raise AdapterNameError(
                f"no adapter named {name!r}; this model has {sorted(peft_model.peft_config)}"
            )
        if not isinstance(config, LoraConfig):
            raise ConfigError(
                f"adapter {name!r} is not a LoRA adapter; add_weighted_adapter combines LoRA adapters"
            )
        if config.use_dora:
            raise ConfigError(
                f"adapter {name!r} uses DoRA, whose magnitude vector does not combine linearly; "
                "add_weighted_adapter combines plain LoRA adapters"
            )
        if config.target_parameters:
            raise ConfigError(
                f"adapter {name!r} has target_parameters={config.target_parameters!r}; add_weighted_adapter "
                "does not combine adapters on parameters (nor does PEFT)"
            )
        configs.append(config)
    return configs


def _combined_config(configs: list[LoraConfig], rank: int) -> LoraConfig:
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        combined_targets: Any = "|".join(f"({t})" for t in targets)
    elif all(isinstance(t, list) for t in targets):
        combined_targets = sorted({name for t in targets for name in t})
    else:
        raise ConfigError(
            "the adapters' target_modules mix a regex string with lists of names; they cannot be combined"
        )
    # alpha chosen so that the new adapter's scaling is exactly 1 (rsLoRA divides by √r, not r)
    alpha = math.sqrt(rank) if configs[0].use_rslora else rank
    return configs[0].replace(
        r=rank,
        lora_alpha=alpha,
        target_modules=combined_targets,
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights=True,
    )


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B at the adapter's own rank (an adapter prepared for compiled hot-swaps holds more, as zeros)."""
    if layer.features.kind == EMBEDDING:
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    else:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    r = layer.r[name]
    return a[:r].detach().float(), b[:, :r].detach().float()


def _cat(layer: LoraLayer, present: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    factors = [_factors(layer, name) for name, _ in present]
    a = torch.cat([w * layer.scaling[name] * fa for (name, w), (fa, _) in zip(present, factors)])
    b = torch.cat([fb for _, fb in factors], dim=1)
    return a, b


def _factor_wise(layer, present, kind, rule) -> tuple[torch.Tensor, torch.Tensor]:
    scales = [w * layer.scaling[name] for name, w in present]
    weights_a = [math.copysign(math.sqrt(abs(s)), s) for s in scales]
    weights_b = [math.sqrt(abs(s)) for s in scales]
    factors = [_factors(layer, name) for name, _ in present]
    a = task_arithmetic.combine(kind, [fa for fa, _ in factors], weights_a, **rule)
    b = task_arithmetic.combine(kind, [fb for _, fb in factors], weights_b, **rule)
    return a, b


def _svd(layer, present, kind, rule, rank, svd) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [layer.delta_weight(name).detach().float() for name, _ in present]
    delta = task_arithmetic.combine(kind, deltas, [w for _, w in present], **rule)
    # one row per output feature: (out, in · kernel); an embedding's output features are its columns
    rows = delta.T if layer.features.kind == EMBEDDING else delta.flatten(1)
    u, s, vh = torch.linalg.svd(rows, full_matrices=svd["full_matrices"], driver=svd["driver"])
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if svd["clamp"] is not None:
        limit = torch.quantile(torch.cat([b.flatten(), a.flatten()]), svd["clamp"])
        b, a = b.clamp(-limit, limit), a.clamp(-limit, limit)
    return a, b


def _write(layer: LoraLayer, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Copy combined factors into the new adapter, zero-filling any rank left over (``cat`` on a partial layer)."""
    if layer.features.kind == EMBEDDING:
        targets = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    else:
        targets = layer.lora_A[name].weight, layer.lora_B[name].weight
    target_a, target_b = targets
    with torch.no_grad():
        target_a.zero_()
        target_b.zero_()
        if layer.features.kind in (CONV1D, CONV2D, CONV3D):
            a = a.reshape(a.shape[0], *target_a.shape[1:])
            b = b.reshape(b.shape[0], b.shape[1], *target_b.shape[2:])
        target_a[: a.shape[0]] = a.to(target_a.dtype)
        target_b[:, : b.shape[1]] = b.to(target_b.dtype)
