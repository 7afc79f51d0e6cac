"""The comparisons and inspections the conformance properties are made of, usable on their own too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.adapter_layer import AdapterLayer


class ConformanceError(AssertionError):
    """A conformance property does not hold; the message names the property, the case and the numbers."""


@dataclass(frozen=True)
class Tolerance:
    """How far two tensors may differ: ``max|actual - expected| <= atol + rtol * scale``.

    ``scale`` is the largest magnitude in the expected tensor (for weights after an unmerge, the larger
    of the base and the merged weight's, since rounding happens at the merged magnitude). A tolerance
    thus reads as an absolute floor plus a fraction of the tensor's scale; ``Tolerance.exact()`` asks
    for bitwise equality.
    """

    atol: float
    rtol: float

    @classmethod
    def exact(cls) -> Tolerance:
        return cls(0.0, 0.0)

    @property
    def is_exact(self) -> bool:
        return self.atol == 0.0 and self.rtol == 0.0

    def __str__(self) -> str:
        return "exact" if self.is_exact else f"atol={self.atol:g}, rtol={self.rtol:g}"


EXACT = Tolerance.exact()

# The kit's default tolerances, by comparison and dtype. A suite overrides any entry (see
# ConformanceSuite.tolerances). Each bound is about 3x the worst difference LoRA showed over a few hundred
# draws (adapter values with std up to 0.1, two transformer blocks): a few units of the dtype's rounding
# (float32 keeps 24 significant bits, float16 11, bfloat16 8) of the output's scale.
DEFAULT_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    # a fresh adapter at identity init against the base model's outputs
    "identity": {"float32": EXACT, "bfloat16": EXACT, "float16": EXACT},
    # merged (and merge_and_unload) against unmerged outputs
    "merge": {
        "float32": Tolerance(atol=1e-6, rtol=1e-5),
        "bfloat16": Tolerance(atol=1e-3, rtol=3e-2),
        "float16": Tolerance(atol=1e-4, rtol=4e-3),
    },
    # base weights after merge then unmerge against the weights before the merge
    "unmerge": {
        "float32": Tolerance(atol=1e-7, rtol=1e-6),
        "bfloat16": Tolerance(atol=0.0, rtol=2e-2),
        "float16": Tolerance(atol=0.0, rtol=2e-3),
    },
    # the loss and each adapter gradient of a training step under torch.autocast (keyed by the autocast
    # dtype) against the float32 step's, in norm (see norm_difference). The bound is 128 units of
    # roundoff u of the autocast dtype (u = 2^-9 in bfloat16, 2^-12 in float16): the worst tensor over
    # 60 draws of each of the kit's methods was 72u in bfloat16 and 78u in float16, and 200 draws each,
    # under AVX512 and under generic CPU kernels, stayed inside the bound.
    "autocast": {
        "bfloat16": Tolerance(atol=0.0, rtol=2.0**-2),
        "float16": Tolerance(atol=0.0, rtol=2.0**-5),
    },
}


def main_output(output: Any) -> torch.Tensor:
    """The tensor a forward's result stands for: ``logits`` of a transformers output, else the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"cannot find the output tensor of a {type(output).__name__}")


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def difference(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance, scale: float | None = None
) -> str | None:
    """None when the tensors agree within the tolerance, else what differs, in words."""
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shapes differ: {tuple(actual.shape)} vs expected {tuple(expected.shape)}"
    if tolerance.is_exact:
        if actual.dtype != expected.dtype:
            return f"dtypes differ: {actual.dtype} vs expected {expected.dtype}"
        if torch.equal(actual, expected):
            return None
        if torch.equal(actual.isnan(), expected.isnan()) and torch.equal(
            torch.nan_to_num(actual, nan=0.0), torch.nan_to_num(expected, nan=0.0)
        ):
            return None
        count = int((actual != expected).sum())
        return f"not bitwise equal: {count} of {actual.numel()} elements differ, max |diff| = {max_abs_diff(actual, expected):.3g}"
    if not torch.isfinite(expected).all():
        return "the expected tensor holds NaN or inf"
    if not torch.isfinite(actual).all():
        return "the tensor holds NaN or inf"
    if scale is None:
        scale = expected.double().abs().max().item() if expected.numel() else 0.0
    diff = max_abs_diff(actual, expected)
    allowed = tolerance.atol + tolerance.rtol * scale
    if diff <= allowed:
        return None
    return f"max |diff| = {diff:.3g} > {allowed:.3g} allowed ({tolerance}, scale {scale:.3g})"


def norm_difference(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance, scale: float | None = None
) -> str | None:
    """None when ``‖actual − expected‖ <= atol + rtol · max(‖expected‖, scale)`` (2-norms over all
    elements), else what differs, in words.

    For results that round in every element, such as gradients under autocast, where a max-norm bound
    would be set by the one element that cancels worst. ``scale`` is a floor for a tensor whose exact
    value cancels toward zero, whose rounding error is then set by the magnitudes that cancelled."""
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shapes differ: {tuple(actual.shape)} vs expected {tuple(expected.shape)}"
    if not torch.isfinite(actual).all():
        return "the tensor holds NaN or inf"
    error = (actual.double() - expected.double()).norm().item()
    norm = expected.double().norm().item()
    reference = max(norm, scale or 0.0)
    allowed = tolerance.atol + tolerance.rtol * reference
    if error <= allowed:
        return None
    floor = f", floor {scale:.3g}" if scale else ""
    relative = error / reference if reference else float("inf")
    return f"‖diff‖ = {error:.3g} > {allowed:.3g} allowed ({tolerance}, ‖expected‖ {norm:.3g}{floor}; relative {relative:.3g})"


def snapshot(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, live tensor, copy)`` for each tensor, to compare later against what it holds then."""
    return [(name, tensor, tensor.detach().clone()) for name, tensor in named]


def _from_package(obj: Any, packages: tuple[str, ...]) -> bool:
    candidates = [obj, type(obj), getattr(obj, "__self__", None), getattr(obj, "func", None)]
    for item in candidates:
        module = getattr(item, "__module__", None)
        if isinstance(module, str) and module.split(".")[0] in packages:
            return True
    return False


HOOK_ATTRIBUTES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def hook_counts(model: nn.Module) -> dict[str, int]:
    """How many hooks of every kind each module holds, by module path."""
    return {
        path: sum(len(getattr(module, attr, {}) or {}) for attr in HOOK_ATTRIBUTES)
        for path, module in model.named_modules()
    }


def leftovers(
    model: nn.Module,
    packages: tuple[str, ...],
    hooks_before: dict[str, int] | None = None,
    base_types: set[type] | None = None,
) -> list[str]:
    """What of peftkit (or of the given packages) is left in a model: modules, hooks, attributes.

    ``hooks_before`` (from :func:`hook_counts` on the base model) lets hooks the base model had stay;
    ``base_types`` lets module classes the base model had stay (a test model defined in a peftkit package).
    """
    found = []
    allowed = base_types or set()
    for path, module in model.named_modules():
        where = path or "<root>"
        if isinstance(module, AdapterLayer) or (
            type(module) not in allowed and _from_package(module, packages)
        ):
            found.append(f"module {where} is a {type(module).__module__}.{type(module).__qualname__}")
        count = 0
        for attr in HOOK_ATTRIBUTES:
            hooks = getattr(module, attr, {}) or {}
            count += len(hooks)
            for hook in hooks.values():
                if _from_package(hook, packages):
                    found.append(f"module {where} keeps a {attr[1:-1]} {hook!r}")
        if hooks_before is not None and count > hooks_before.get(path, 0):
            found.append(f"module {where} has {count} hooks, the base model had {hooks_before.get(path, 0)}")
        for name, value in vars(module).items():
            if name.startswith("_"):
                continue
            values = (
                value.values()
                if isinstance(value, dict)
                else value
                if isinstance(value, (list, tuple))
                else [value]
            )
            if any(
                _from_package(item, packages) for item in values if not isinstance(item, (str, int, float))
            ):
                found.append(f"module {where} keeps the attribute {name!r} = {value!r}")
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        for hook in getattr(torch.nn.modules.module, attr, {}).values():
            if _from_package(hook, packages):
                found.append(f"a global {attr[8:-1]} {hook!r} is registered")
    return found
