"""LoRA on a linear layer as one autograd node: y' = y + s · (drop(x) Aᵀ) Bᵀ.

Where the base is a plain ``nn.Linear`` with a frozen weight, :class:`LinearWithLora` computes the base
output in the same node, y = x Wᵀ + b, so backward gets ∂x = g W + drop'(u A) from one ``addmm``
instead of two products summed by autograd.

The plain path (``b(a(dropout(x))) * s`` then ``y + …``) builds four autograd nodes, each full-size
elementwise step a pass over memory, and with dropout keeps both the mask and the dropped copy of
``x`` for backward. This node adds the update with one ``addmm`` (the scale folded in) and keeps only
``x``, the ``(N, r)`` down-projection and the dropout seed: the mask is drawn again from its seed in
backward (:func:`dropout_keep`). The gradients, with ``g`` the gradient of y' and ``u = s · g B``:

    ∂y = g,    ∂B = s · gᵀ (drop(x) Aᵀ),    ∂A = uᵀ drop(x),    ∂x = drop'(u A)

where ``drop'`` applies the same mask and ``1/(1-p)`` scale as ``drop``. The mask is kept as 0/1 and the
``1/(1-p)`` goes on the ``(N, r)`` products, so ``x ⊙ keep`` is exact in any dtype and no full-size
pass scales it.

Under ``torch.autocast`` the node follows autocast's rule for ``addmm``: its floating inputs are cast to
the autocast dtype first (grads flow back through the casts to the float32 adapter) and the node runs,
forward and backward, with autocast off. Where the base output ``y`` has another dtype than the update
(a quantized base that returns float32), the update is cast to ``y``'s dtype and added, as the plain
path's ``y + lora.to(y.dtype)`` does. The dropout mask does not depend on the dtype, so a run under
autocast drops the same elements as the float32 run with the same seed.

The scale ``s`` is a Python float, or a 0-dim tensor once ``prepare_model_for_compiled_hotswap`` made it
one (so that a compiled graph reads it as an input and a new alpha changes no guard). ``addmm`` takes
only a number as its ``alpha``: a tensor scale multiplies the ``(N, r)`` down-projection instead, and
backward reads it from the saved tensors.
"""

from __future__ import annotations

import contextlib

import torch


def new_seed() -> int:
    """A dropout seed drawn from torch's global generator, so ``torch.manual_seed`` makes runs repeat."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def dropout_keep(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Which elements inverted dropout keeps: a bool tensor shaped like ``like``, the same for the same seed.

    An element is kept where a uniform 16-bit random integer falls below ``round((1 - p) · 2¹⁶)``, so the
    keep rate is within 2⁻¹⁷ of ``1 - p``; four elements share one 64-bit draw. On the CPU this is about
    five times faster than ``bernoulli_``, which draws a double per element: drawing the mask again in
    backward then costs less than keeping it would (see docs/benchmarks.md)."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    count = like.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=like.device)
    words.random_(-(2**63), None, generator=generator)
    threshold = round((1 - p) * 2**16) - 2**15
    return (words.view(torch.int16)[:count] < threshold).view(like.shape)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on this device type, or None where it is off."""
    # torch 2.11's dynamo cannot trace is_autocast_available (torch 2.13's can); a compiled forward runs
    # on a device that has autocast, so only the eager path asks
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
    if available and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def compute_dtype(
    x: torch.Tensor, lora_a: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.dtype | None:
    """The dtype the node computes in, or None where it cannot run as the plain path would.

    Under autocast: autocast's dtype, to which every input is cast. Otherwise the input, the adapter
    (and the base weight, where the node computes the base output too) must share one dtype: the plain
    path would cast the input to the adapter's dtype, which the node does not."""
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        return cast
    dtypes = {x.dtype, lora_a.dtype} | ({weight.dtype} if weight is not None else set())
    return x.dtype if len(dtypes) == 1 else None


def _autocast_off(device_type: str):
    if autocast_dtype(device_type) is not None:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()  # cheaper than a disabled autocast, entered on every call


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """As autocast casts an input: floating tensors other than float64 take the autocast dtype."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype in (dtype, torch.float64):
        return tensor
    return tensor.to(dtype)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


def _down(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as rows, and ``drop(x) Aᵀ``."""
    rows = _rows(x)
    if p == 0:
        return rows, rows @ lora_a.t()
    return rows, ((rows * dropout_keep(rows, p, seed)) @ lora_a.t()).mul_(1 / (1 - p))


Scale = float | torch.Tensor


def _add_update(
    result: torch.Tensor, down: torch.Tensor, lora_b: torch.Tensor, scaling: Scale
) -> torch.Tensor:
    """``result + scaling · down Bᵀ`` as rows: one ``addmm`` where the dtypes agree, else the update is
    computed in the adapter's dtype and cast to ``result``'s, as the plain path does."""
    rows = _rows(result)
    if rows.dtype == down.dtype:
        if isinstance(scaling, torch.Tensor):
            return torch.addmm(rows, down * scaling, lora_b.t())
        return torch.addmm(rows, down, lora_b.t(), alpha=scaling)
    return rows + (down @ lora_b.t()).mul_(scaling).to(rows.dtype)


def _add_update_into(out: torch.Tensor, down: torch.Tensor, lora_b: torch.Tensor, scaling: Scale) -> None:
    """``out += scaling · down Bᵀ`` in place, ``out`` as rows in the adapter's dtype."""
    if isinstance(scaling, torch.Tensor):
        out.addmm_(down * scaling, lora_b.t())
    else:
        out.addmm_(down, lora_b.t(), alpha=scaling)


def _save_scaling(ctx, scaling: Scale) -> tuple[torch.Tensor, ...]:
    """A tensor scale goes with the saved tensors (returned for ``save_for_backward``), a float on ``ctx``."""
    ctx.scaling = None if isinstance(scaling, torch.Tensor) else scaling
    return (scaling,) if isinstance(scaling, torch.Tensor) else ()


def _lora_backward(
    ctx, grad, x, down, lora_a, lora_b, scaling: Scale, needs_x: bool, needs_a: bool, needs_b: bool
):
    """The gradient as rows ``g``, the gradient reaching ``x`` through the adapter (``drop'(u A)``), ∂A and ∂B.

    ``g`` keeps the output's dtype; the adapter's products run in the adapter's."""
    g = _rows(grad)
    g_adapter = g.to(down.dtype)
    up = (g_adapter @ lora_b).mul_(scaling)
    keep = None
    if ctx.p > 0 and (needs_x or needs_a):
        keep = dropout_keep(_rows(x), ctx.p, ctx.seed)
        up.mul_(1 / (1 - ctx.p))  # drop's scale, on (N, r): both products that read u apply the 0/1 mask
    through = grad_a = grad_b = None
    if needs_x:
        through = up @ lora_a
        if keep is not None:
            through.mul_(keep)
    if needs_a:
        grad_a = up.t() @ (_rows(x) * keep if keep is not None else _rows(x))
    if needs_b:
        grad_b = (g_adapter.t() @ down).mul_(scaling)
    return g, through, grad_a, grad_b


class LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, x, lora_a, lora_b, scaling: Scale, p: float, seed: int):
        _, down = _down(x, lora_a, p, seed)
        out = _add_update(result, down, lora_b, scaling)
        ctx.save_for_backward(x, down, lora_a, lora_b, *_save_scaling(ctx, scaling))
        ctx.p, ctx.seed = p, seed
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x, down, lora_a, lora_b, *scale_tensor = ctx.saved_tensors
        scaling = scale_tensor[0] if scale_tensor else ctx.scaling
        with _autocast_off(grad.device.type):
            g, through, grad_a, grad_b = _lora_backward(
                ctx, grad, x, down, lora_a, lora_b, scaling, *ctx.needs_input_grad[1:4]
            )
        grad_x = through.view(x.shape) if through is not None else None
        # the base layer's backward reads the same gradient as 2-D rows: hand it the rows made here (a
        # copy when the gradient came through a transposed view, as q, k and v's do) so it needs none
        return g.view(grad.shape), grad_x, grad_a, grad_b, None, None, None


class LinearWithLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: Scale, p: float, seed: int):
        rows, down = _down(x, lora_a, p, seed)
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        _add_update_into(out, down, lora_b, scaling)
        # the base weight is needed only to pass the gradient on to x (the first layer's x needs none)
        kept_weight = weight if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(x, down, kept_weight, lora_a, lora_b, *_save_scaling(ctx, scaling))
        ctx.p, ctx.seed = p, seed
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, down, weight, lora_a, lora_b, *scale_tensor = ctx.saved_tensors
        scaling = scale_tensor[0] if scale_tensor else ctx.scaling
        needs = ctx.needs_input_grad
        with _autocast_off(grad.device.type):
            g, through, grad_a, grad_b = _lora_backward(
                ctx, grad, x, down, lora_a, lora_b, scaling, needs[0], needs[3], needs[4]
            )
            grad_x = torch.addmm(through, g, weight).view(x.shape) if through is not None else None
            grad_bias = g.sum(0) if needs[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def linear_with_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Scale,
    p: float = 0.0,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling · lora_b(lora_a(dropout_p(x)))``; ``weight`` must be frozen.

    Callers check :func:`compute_dtype` first (with ``weight``): it must not be None."""
    if weight.requires_grad:
        raise ValueError("linear_with_lora computes no gradient for the base weight: it must be frozen")
    seed = new_seed() if p > 0 else 0
    cast = autocast_dtype(x.device.type)
    if cast is None:
        return LinearWithLora.apply(x, weight, bias, lora_a, lora_b, scaling, p, seed)
    inputs = [_cast(t, cast) for t in (x, weight, bias, lora_a, lora_b)]
    with _autocast_off(x.device.type):
        return LinearWithLora.apply(*inputs, scaling, p, seed)


def lora_linear(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Scale,
    p: float = 0.0,
) -> torch.Tensor:
    """``result + scaling · lora_b(lora_a(dropout_p(x)))`` for 2-D ``lora_a``/``lora_b`` weights.

    Callers check :func:`compute_dtype` first: it must not be None. ``result`` may have another dtype."""
    cast = autocast_dtype(x.device.type)
    if cast is not None:
        x, lora_a, lora_b = [_cast(t, cast) for t in (x, lora_a, lora_b)]
    with _autocast_off(x.device.type):
        if not torch.is_grad_enabled() and p == 0:
            return _add_update(result, _rows(x) @ lora_a.t(), lora_b, scaling).view(result.shape)
        seed = new_seed() if p > 0 else 0
        return LoraLinear.apply(result, x, lora_a, lora_b, scaling, p, seed)


# --- sibling layers that read one input (peftkit_lora.siblings) ------------------------------------------
#
# Layers that read the same input (q, k and v; gate and up) get their down-projections from one product,
# ``x [A₁; A₂; …]ᵀ`` (:class:`GroupedDown`), and each adds its own update from its columns
# (:class:`LinearWithDown` on a bare linear base, :class:`LoraUp` after any other). Only without dropout:
# each layer would draw its own mask. The grouped node keeps ``x`` and the stacked A's for backward; each
# layer keeps its columns of the down-projection (one storage for all of them), never ``x``.


def stack_factors(factors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``[A₁; A₂; …]`` in ``dtype``, outside autograd: :class:`GroupedDown` returns each A's gradient."""
    with torch.no_grad():
        return torch.cat([factor.to(dtype) for factor in factors])


class GroupedDown(torch.autograd.Function):
    """``(x A₁ᵀ, x A₂ᵀ, …)`` from one product ``x Sᵀ``, ``S = [A₁; A₂; …]`` (``stacked``, in the dtype of ``x``).

    With ``G = [g₁ g₂ …]`` the gradients of the outputs side by side: ∂x = G S and ∂S = Gᵀ x, one product
    each; ∂Aᵢ is its rows of ∂S, in Aᵢ's dtype (as autocast's cast of Aᵢ passes it back)."""

    @staticmethod
    def forward(ctx, x, stacked, *factors):
        ctx.save_for_backward(x, stacked)
        ctx.ranks = [factor.shape[0] for factor in factors]
        ctx.dtypes = [factor.dtype for factor in factors]
        return (_rows(x) @ stacked.t()).split(ctx.ranks, dim=1)

    @staticmethod
    def backward(ctx, *grads):
        x, stacked = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grad_factors = None, [None] * len(ctx.ranks)
        with _autocast_off(x.device.type):
            g = torch.cat([grad.to(stacked.dtype) for grad in grads], dim=1)
            if needs[0]:
                grad_x = (g @ stacked).view(x.shape)
            if any(needs[2:]):
                parts = (g.t() @ _rows(x)).split(ctx.ranks)
                grad_factors = [
                    part.to(dtype) if need else None for part, dtype, need in zip(parts, ctx.dtypes, needs[2:])
                ]
        return grad_x, None, *grad_factors


def grouped_down(x: torch.Tensor, factors: list[torch.Tensor], stacked: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each factor's ``x Aᵀ``, from one product against ``stacked`` (:func:`stack_factors` of the factors in
    the dtype :func:`compute_dtype` gives); under autocast ``x`` is cast to it first, as autocast would."""
    cast = autocast_dtype(x.device.type)
    if cast is None:
        return GroupedDown.apply(x, stacked, *factors)
    with _autocast_off(x.device.type):
        return GroupedDown.apply(_cast(x, cast), stacked, *factors)


class LinearWithDown(torch.autograd.Function):
    """:class:`LinearWithLora` given the down-projection ``u = x Aᵀ`` made for it (by :class:`GroupedDown`):
    y' = x Wᵀ + b + s · u Bᵀ. Backward: ∂x = g W, ∂u = s · g B, ∂B = s · gᵀ u; it keeps ``u``, not ``x``."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, lora_b, scaling: Scale):
        rows = _rows(x)
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        _add_update_into(out, down, lora_b, scaling)
        kept_weight = weight if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(down, kept_weight, lora_b, *_save_scaling(ctx, scaling))
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        down, weight, lora_b, *scale_tensor = ctx.saved_tensors
        scaling = scale_tensor[0] if scale_tensor else ctx.scaling
        needs = ctx.needs_input_grad
        grad_x = grad_bias = grad_down = grad_b = None
        with _autocast_off(grad.device.type):
            g = _rows(grad)
            if needs[0]:
                grad_x = (g @ weight).view(ctx.x_shape)
            if needs[2]:
                grad_bias = g.sum(0)
            if needs[3]:
                grad_down = (g @ lora_b).mul_(scaling)
            if needs[4]:
                grad_b = (g.t() @ down).mul_(scaling)
        return grad_x, None, grad_bias, grad_down, grad_b, None


class LoraUp(torch.autograd.Function):
    """:class:`LoraLinear` given the down-projection ``u = x Aᵀ``: ``result + s · u Bᵀ``. Backward: ∂result = g,
    ∂u = s · g B, ∂B = s · gᵀ u, the adapter's products in the adapter's dtype."""

    @staticmethod
    def forward(ctx, result, down, lora_b, scaling: Scale):
        out = _add_update(result, down, lora_b, scaling)
        ctx.save_for_backward(down, lora_b, *_save_scaling(ctx, scaling))
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        down, lora_b, *scale_tensor = ctx.saved_tensors
        scaling = scale_tensor[0] if scale_tensor else ctx.scaling
        needs = ctx.needs_input_grad
        grad_down = grad_b = None
        with _autocast_off(grad.device.type):
            g = _rows(grad)
            g_adapter = g.to(down.dtype)
            if needs[1]:
                grad_down = (g_adapter @ lora_b).mul_(scaling)
            if needs[2]:
                grad_b = (g_adapter.t() @ down).mul_(scaling)
        return g.view(grad.shape), grad_down, grad_b, None


def linear_with_down(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Scale,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling · down Bᵀ``, ``down`` from :func:`grouped_down`; ``weight`` frozen."""
    cast = autocast_dtype(x.device.type)
    if cast is None:
        return LinearWithDown.apply(x, weight, bias, down, lora_b, scaling)
    x, weight, bias, lora_b = [_cast(t, cast) for t in (x, weight, bias, lora_b)]
    with _autocast_off(x.device.type):
        return LinearWithDown.apply(x, weight, bias, down, lora_b, scaling)


def lora_up(result: torch.Tensor, down: torch.Tensor, lora_b: torch.Tensor, scaling: Scale) -> torch.Tensor:
    """``result + scaling · down Bᵀ``, ``down`` from :func:`grouped_down`; ``result`` may have another dtype."""
    cast = autocast_dtype(down.device.type)
    if cast is not None:
        lora_b = _cast(lora_b, cast)
    with _autocast_off(down.device.type):
        if not torch.is_grad_enabled():
            return _add_update(result, down, lora_b, scaling).view(result.shape)
        return LoraUp.apply(result, down, lora_b, scaling)
