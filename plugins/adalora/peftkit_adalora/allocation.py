"""AdaLoRA's rank allocation, with the semantics of PEFT's RankAllocator.

After each optimizer step (before gradients are zeroed), for every entry of every adapter tensor p
(P, Λ and Q of each adapted module)::

    I = |p · ∂L/∂p|                       sensitivity
    Ī ← β1 · Ī + (1 − β1) · I             smoothed sensitivity (beta1)
    Ū ← β2 · Ū + (1 − β2) · |I − Ī|       uncertainty (beta2)
    s = Ī · Ū                             the entry's score

Triplet i of a module scores ``S_i = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki)``. The budget (triplets
kept over all modules) starts at ``b0 = Σ init_r`` and ends at ``bT = target_r × modules``::

    b(t) = b0                                                   t ≤ tinit
    b(t) = ⌊bT + (b0 − bT) · (1 − (t − tinit) / (T − tfinal − tinit))³⌋   tinit < t ≤ T − tfinal
    b(t) = bT                                                   t > T − tfinal        (T = total_step)

In the middle phase, every ``deltaT`` steps, and once more at ``t = T − tfinal``, the ``b0 − b(t)``
lowest-scored triplets (and any tied with the last of them) get ``Λ_i = 0``; which triplets are kept
goes to ``config.rank_pattern``. After ``T − tfinal`` the scores stop, the ranks are final, and each
step zeroes the pruned ``Λ_i`` again (the optimizer would revive them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftkit_adalora.config import AdaLoraConfig
from peftkit_adalora.layer import AdaLoraLayer, rank_pattern_key

TENSORS = ("lora_A", "lora_E", "lora_B")
Layers = Sequence[tuple[str, AdaLoraLayer]]


def budget_schedule(
    step: int, config: AdaLoraConfig, initial_budget: int, target_budget: int
) -> tuple[int, bool]:
    """The budget at ``step``, and whether to prune to it now (the final allocation step always prunes)."""
    final_step = config.total_step - config.tfinal
    if step <= config.tinit:
        return initial_budget, False
    if step > final_step:
        return target_budget, True
    remaining = 1 - (step - config.tinit) / (final_step - config.tinit)
    budget = int((initial_budget - target_budget) * remaining**3 + target_budget)
    return budget, step % config.deltaT == 0


def update_importance(layers: Layers, adapter_name: str, beta1: float, beta2: float) -> None:
    """Fold this step's sensitivity |p · ∇p| into each entry's smoothed sensitivity and uncertainty."""
    with torch.no_grad():
        for path, layer in layers:
            sensitivity = layer.sensitivity.setdefault(adapter_name, {})
            uncertainty = layer.uncertainty.setdefault(adapter_name, {})
            for name in TENSORS:
                param = getattr(layer, name)[adapter_name]
                if param.grad is None:
                    raise RuntimeError(
                        f"AdaLoRA: {path}.{name} has no gradient; call update_and_allocate(step) after "
                        "loss.backward() and optimizer.step(), before optimizer.zero_grad()"
                    )
                now = (param * param.grad).abs()
                smoothed = sensitivity.get(name, torch.zeros_like(now))
                smoothed = beta1 * smoothed + (1 - beta1) * now
                spread = uncertainty.get(name, torch.zeros_like(now))
                uncertainty[name] = beta2 * spread + (1 - beta2) * (now - smoothed).abs()
                sensitivity[name] = smoothed


def triplet_scores(layer: AdaLoraLayer, adapter_name: str) -> torch.Tensor:
    """S_i = s(Λ_i) + mean over row i of s(Q) + mean over column i of s(P), one per triplet."""
    if adapter_name not in layer.sensitivity:
        raise RuntimeError(
            "AdaLoRA: no importance scores to prune by; call update_and_allocate(step) at every optimizer "
            "step from step 0"
        )
    score = {
        name: layer.sensitivity[adapter_name][name] * layer.uncertainty[adapter_name][name]
        for name in TENSORS
    }
    return score["lora_E"].view(-1) + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)


def mask_to_budget(
    layers: Layers, adapter_name: str, budget: int, initial_budget: int
) -> dict[str, list[bool]]:
    """Zero the singular values of the lowest-scored triplets so that ``budget`` remain; say which remain."""
    scores = {path: triplet_scores(layer, adapter_name) for path, layer in layers}
    pruned = initial_budget - budget
    if pruned > 0:
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=pruned).values.item()
    else:
        threshold = float("-inf")
    rank_pattern = {}
    for path, layer in layers:
        kept = scores[path] > threshold
        layer.zero_pruned(adapter_name, kept)
        rank_pattern[rank_pattern_key(path)] = kept.tolist()
    return rank_pattern


def reset_importance(layers: Layers, adapter_name: str) -> None:
    for _, layer in layers:
        layer.sensitivity.pop(adapter_name, None)
        layer.uncertainty.pop(adapter_name, None)


def zero_pruned_triplets(layers: Layers, adapter_name: str) -> None:
    """Zero again the singular values that the rank pattern pruned (layers still at full rank)."""
    for _, layer in layers:
        kept = layer.kept(adapter_name)
        if kept is not None and layer.is_full_rank(adapter_name):
            layer.zero_pruned(adapter_name, torch.tensor(kept, dtype=torch.bool))


def update_and_allocate(layers: Layers, config: AdaLoraConfig, adapter_name: str, global_step: int) -> None:
    """PEFT's ``update_and_allocate`` for one optimizer step: score, prune on schedule, record the ranks."""
    final_step = config.total_step - config.tfinal
    if global_step > final_step:
        if config.rank_pattern is None:
            raise RuntimeError(
                f"AdaLoRA: step {global_step} is past the allocation (which ends at total_step - tfinal = "
                f"{final_step}), but no ranks were allocated: call update_and_allocate at every step from 0"
            )
        zero_pruned_triplets(layers, adapter_name)
        return
    not_full = [path for path, layer in layers if not layer.is_full_rank(adapter_name)]
    if not_full:
        raise RuntimeError(
            f"AdaLoRA: adapter {adapter_name!r} was created at the ranks of its config's rank_pattern (e.g. "
            f"{not_full[0]!r}), so its ranks are final; to allocate ranks again, start from a config "
            "without rank_pattern"
        )
    initial_budget = sum(layer.r[adapter_name] for _, layer in layers)
    target_budget = config.target_r * len(layers)
    if global_step < final_step:
        update_importance(layers, adapter_name, config.beta1, config.beta2)
    budget, prune_now = budget_schedule(global_step, config, initial_budget, target_budget)
    if prune_now or global_step == final_step:
        config.rank_pattern = mask_to_budget(layers, adapter_name, budget, initial_budget)
    if global_step == final_step:
        reset_importance(layers, adapter_name)
