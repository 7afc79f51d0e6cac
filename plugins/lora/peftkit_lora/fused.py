"""LoRA on a linear layer as one autograd node: y' = y + s · (drop(x) Aᵀ) Bᵀ.

Where the base is a plain ``nn.Linear`` with a frozen weight, :class:`LinearWithLora` computes the base
output in the same node, y = x Wᵀ + b, so backward gets ∂x = g W + drop'(u A) from one ``addmm``
instead of two products summed by autograd.

The plain path (``b(a(dropout(x))) * s`` then ``y + …``) builds four autograd nodes, each full-size
elementwise step a pass over memory, and with dropout keeps both the mask and the dropped copy of
``x`` for backward. This node adds the update with one ``addmm`` (the scale folded in) and keeps only
``x``, the ``(N, r)`` down-projection and the dropout seed: the mask is drawn again from its seed in
backward. The gradients, with ``g`` the gradient of y' and ``u = s · g B``:

    ∂y = g,    ∂B = s · gᵀ (drop(x) Aᵀ),    ∂A = uᵀ drop(x),    ∂x = drop'(u A)

where ``drop'`` applies the same mask and ``1/(1-p)`` scale as ``drop``.
"""

from __future__ import annotations

import torch


def new_seed() -> int:
    """A dropout seed drawn from torch's global generator, so ``torch.manual_seed`` makes runs repeat."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The kept-and-scaled mask of inverted dropout: 0 or 1/(1-p), the same for the same seed."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    keep = torch.empty_like(like).bernoulli_(1 - p, generator=generator)
    return keep.div_(1 - p)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


def _down(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as rows, and ``drop(x) Aᵀ``."""
    rows = _rows(x)
    dropped = rows * dropout_mask(rows, p, seed) if p > 0 else rows
    return rows, dropped @ lora_a.t()


def _lora_backward(ctx, grad, x, down, lora_a, lora_b, needs_x: bool, needs_a: bool, needs_b: bool):
    """The gradient as rows ``g``, the gradient reaching ``x`` through the adapter (``drop'(u A)``), ∂A and ∂B."""
    g = _rows(grad)
    up = (g @ lora_b).mul_(ctx.scaling)
    mask = dropout_mask(_rows(x), ctx.p, ctx.seed) if ctx.p > 0 else None
    through = grad_a = grad_b = None
    if needs_x:
        through = up @ lora_a
        if mask is not None:
            through.mul_(mask)
    if needs_a:
        grad_a = up.t() @ (_rows(x) * mask if mask is not None else _rows(x))
    if needs_b:
        grad_b = (g.t() @ down).mul_(ctx.scaling)
    return g, through, grad_a, grad_b


class LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, x, lora_a, lora_b, scaling: float, p: float, seed: int):
        _, down = _down(x, lora_a, p, seed)
        out = torch.addmm(_rows(result), down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, down, lora_a, lora_b)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x, down, lora_a, lora_b = ctx.saved_tensors
        g, through, grad_a, grad_b = _lora_backward(ctx, grad, x, down, lora_a, lora_b, *ctx.needs_input_grad[1:4])
        grad_x = through.view(x.shape) if through is not None else None
        # the base layer's backward reads the same gradient as 2-D rows: hand it the rows made here (a
        # copy when the gradient came through a transposed view, as q, k and v's do) so it needs none
        return g.view(grad.shape), grad_x, grad_a, grad_b, None, None, None


class LinearWithLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, seed: int):
        rows, down = _down(x, lora_a, p, seed)
        out = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        out.addmm_(down, lora_b.t(), alpha=scaling)
        # the base weight is needed only to pass the gradient on to x (the first layer's x needs none)
        ctx.save_for_backward(x, down, weight if ctx.needs_input_grad[0] else None, lora_a, lora_b)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, down, weight, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g, through, grad_a, grad_b = _lora_backward(ctx, grad, x, down, lora_a, lora_b, needs[0], needs[3], needs[4])
        grad_x = torch.addmm(through, g, weight).view(x.shape) if through is not None else None
        grad_bias = g.sum(0) if needs[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def linear_with_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    p: float = 0.0,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling · lora_b(lora_a(dropout_p(x)))``; ``weight`` must be frozen."""
    if weight.requires_grad:
        raise ValueError("linear_with_lora computes no gradient for the base weight: it must be frozen")
    return LinearWithLora.apply(x, weight, bias, lora_a, lora_b, scaling, p, new_seed() if p > 0 else 0)


def lora_linear(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    p: float = 0.0,
) -> torch.Tensor:
    """``result + scaling · lora_b(lora_a(dropout_p(x)))`` for 2-D ``lora_a``/``lora_b`` weights."""
    if not torch.is_grad_enabled() and p == 0:
        return torch.addmm(_rows(result), _rows(x) @ lora_a.t(), lora_b.t(), alpha=scaling).view(result.shape)
    return LoraLinear.apply(result, x, lora_a, lora_b, scaling, p, new_seed() if p > 0 else 0)
