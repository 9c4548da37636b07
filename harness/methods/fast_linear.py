"""Adapted-Linear forwards at the hardware's pace: the arithmetic of the adapter methods, not their modules.

A low-rank adapter on a frozen Linear, ``y = x W^T + bias + scale (x a^T) b^T``, written as separate
modules (peft's ``lora_A``/``lora_B``, dropout, scaling, an add) costs a dozen kernels and two passes over
the layer's output per forward and again per backward, and its casts copy the activations. Eager, that is
bound by Python's kernel launches; compiled, by memory traffic. :func:`low_rank_linear` is one autograd
function: the update is added inside the base matmul's epilogue (``addmm`` with beta = 1), the backward
takes the input gradient in two GEMMs and never forms the frozen weight's gradient, and under autocast it
computes in the autocast dtype once (activations saved in bf16, as a plain Linear does).

It matches peft's outputs and gradients (``tests/test_fast_paths.py``); ``fast_peft`` swaps it into
peft's layers.
"""

from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear would run in here: autocast's where autocast is on for ``x``'s device."""
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _LowRankLinear(torch.autograd.Function):
    """y = x W^T + bias + scale (x a^T) b^T with W and bias frozen; gradients for x, a and b only."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float):
        dt = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)
            w, ac, bc = weight.to(dt), a.to(dt), b.to(dt)
            xa = x2 @ ac.t()
            if bias is not None:
                y = torch.addmm(bias.to(dt), x2, w.t())
            else:
                y = x2 @ w.t()
            y.addmm_(xa, bc.t(), alpha=scale)
        ctx.save_for_backward(x2, w, ac, bc, xa)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        ctx.a_dtype, ctx.b_dtype = a.dtype, b.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, w, a, b, xa = ctx.saved_tensors
        scale = ctx.scale
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        gb = g @ b  # (N, r): the gradient through the adapter, before A
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w).addmm_(gb, a, alpha=scale)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = (gb.t() @ x2).mul_(scale).to(ctx.a_dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ xa).mul_(scale).to(ctx.b_dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("low_rank_linear keeps the base weight and bias frozen; a trainable base layer "
                               "takes the module's own forward")
        return grad_x, None, None, grad_a, grad_b, None


def low_rank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                    b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x W^T + bias + scale (x a^T) b^T`` for a frozen ``weight`` (out x in), ``a`` (r x in), ``b`` (out x r).

    ``a`` and ``b`` may be parameters or tensors computed from them (VeRA's scaled bases, AdaLoRA's
    ``A * E``); their gradients flow back through autograd as usual.
    """
    return _LowRankLinear.apply(x, weight, bias, a, b, float(scale))

