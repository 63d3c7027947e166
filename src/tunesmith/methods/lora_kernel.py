"""LoRA's forward and backward as one autograd function: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ.

Written as plain autograd ops, a LoRA layer costs, besides its two thin matmuls, three passes over
its (tokens, out) output in forward (s·(·), the cast, y + ·) and in backward a (tokens, out) product
for the scale, another for the sum of the two input gradients, and every op's bookkeeping. Measured
on this project's 2-core AVX2 CPU (fp32, one thread) the LoRA side of the model's linears was ~16%
of their time at r = 16, about twice its share of the FLOPs. Here the update is added onto the base
output in place by one `addmm_` (the scale rides on the (tokens, r) factor), backward adds the
LoRA input gradient onto the base one in place, and only x and the (tokens, r) activation are
saved — what the autograd graph saved already. The arithmetic is the same matmuls in the same
order, so results match the autograd version to rounding (tests/test_short_samples.py).

Used by `LoRALinear.forward` only where it applies: a dense weight (not a quantised one), no
dropout on the LoRA input, no DoRA, and either autocast (everything is cast to its dtype, as
autocast's own linear does) or x, W, A and B of one dtype. Everything else takes the autograd path.
"""
from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def applies(x: torch.Tensor, weight, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `lora_linear` can compute this call (else use the autograd ops)."""
    if not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False  # a quantised or otherwise wrapped weight has its own matmul
    if not (x.is_floating_point() and weight.is_floating_point()) or x.device != weight.device:
        return False
    if x.device.type == "meta":  # shape-only models (estimate --sizes): autocast has no meta dtype
        return False
    if _compute_dtype(x) is not None:
        return True
    return x.dtype == weight.dtype == a.dtype == b.dtype


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float):
        dtype = _compute_dtype(x)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, a.dtype, b.dtype)
        if dtype is not None:  # autocast: every operand in its dtype, as its F.linear would cast them
            x, weight, a, b = x.to(dtype), weight.to(dtype), a.to(dtype), b.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            h = x2 @ a.t()  # (N, r)
            y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
            y.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] or ctx.needs_input_grad[3] else None, weight, a, b, h)
        ctx.scale, ctx.shape = scale, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, a, b, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
        gh = (g @ b).mul_(ctx.scale)  # (N, r): the gradient of x Aᵀ
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need[0]:
            grad_x = (g @ weight).addmm_(gh, a).view(*ctx.shape).to(ctx.dtypes[0])
        if need[1]:
            grad_w = (g.t() @ x2).to(ctx.dtypes[1])
        if need[2]:
            grad_bias = g.sum(0).to(ctx.dtypes[2])
        if need[3]:
            grad_a = (gh.t() @ x2).to(ctx.dtypes[3])
        if need[4]:
            grad_b = (g.t() @ h).mul_(ctx.scale).to(ctx.dtypes[4])
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
    """x Wᵀ + bias + scale · (x Aᵀ) Bᵀ in one autograd node (check `applies` first)."""
    return _LoRALinearFn.apply(x, weight, bias, a, b, float(scale))
