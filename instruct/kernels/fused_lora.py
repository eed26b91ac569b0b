"""peft's LoRA ``Linear`` computed as one autograd function (``lora.fused``).

The layers peft built become :class:`FusedLoraLinear` in place (:mod:`instruct.compat.peft`
says how and why), so weights, state dict names, merging and export are unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from instruct.compat import peft as peft_compat
from instruct.kernels.dropout import DropoutDrawer


def fuse_lora(model: Any, drawer: DropoutDrawer | None = None) -> int:
    """Make every plain LoRA linear layer of ``model`` compute as one autograd function;
    return how many. Weights, state dict names, merging and export are unchanged.
    ``drawer`` draws those layers' dropout (a new ``auto`` one when not given)."""
    drawer = DropoutDrawer() if drawer is None else drawer
    lora_linear = peft_compat.lora_linear_class()
    fused = 0
    for module in model.modules():
        if type(module) is not lora_linear or module.fan_in_fan_out:
            continue
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear:  # quantised or otherwise special weights
            continue
        plain = all(
            type(module.lora_A[name]) is torch.nn.Linear
            and type(module.lora_B[name]) is torch.nn.Linear
            and module.lora_B[name].bias is None
            and type(module.lora_dropout[name]) in (torch.nn.Dropout, torch.nn.Identity)
            for name in module.lora_A
        )
        if plain:
            peft_compat.become(module, fused_lora_class())
            module.dropout_drawer = drawer
            fused += 1
    return fused


@functools.cache
def fused_lora_class() -> type:
    """:class:`FusedLoraLinear`, made on first use: peft takes seconds to import."""

    class FusedLoraLinear(peft_compat.lora_linear_class()):
        """peft's LoRA ``Linear``, computed as one autograd function (:class:`LoraLinearFunction`).

        peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the sum and the scaling
        are two more passes over the layer's output, forward and backward, the dropped input is
        kept as two float copies of ``x``, and the gradient of ``x`` from the adapter is added to
        the base layer's in one more pass. Here the adapter's product is accumulated into the
        base layer's output by the matmul itself (and into ``x``'s gradient the same way), the
        scalings act on the rank-sized side, and the backward pass keeps ``x``, what dropout
        dropped (see :class:`~instruct.kernels.dropout.DropoutDrawer`) and the ``rank`` numbers
        per row of ``dropout(x) @ A.T``. Each input element is kept with probability ``1 - p``
        and scaled by ``1 / (1 - p)``, as ``nn.Dropout`` does, with a new draw every call.
        Anything else (several active adapters, DoRA and other variants, merged or disabled
        adapters, extra arguments, weights and input of several dtypes outside autocast) runs
        peft's own forward.
        """

        dropout_drawer: DropoutDrawer  # set by fuse_lora

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            names = self.active_adapters
            name = names[0] if len(names) == 1 else None
            if (
                args
                or kwargs
                or name not in self.lora_A
                or name in self.lora_variant
                or self.disable_adapters
                or self.merged
            ):
                return super().forward(x, *args, **kwargs)
            base, a, b = self.get_base_layer(), self.lora_A[name].weight, self.lora_B[name].weight
            if not torch.is_autocast_enabled(x.device.type) and not (
                x.dtype == base.weight.dtype == a.dtype == b.dtype
            ):  # peft computes the adapter in its own dtype; so would we, in another order
                return super().forward(x, *args, **kwargs)
            dropout = self.lora_dropout[name]
            p = dropout.p if self.training and isinstance(dropout, torch.nn.Dropout) else 0.0
            drop = self.dropout_drawer.draw(x.shape, p, x.device) if p > 0 else None
            return LoraLinearFunction.apply(
                x,
                base.weight,
                base.bias,
                a,
                b,
                drop,
                1 / (1 - p),
                self.scaling[name],
            )

    return FusedLoraLinear


class LoraLinearFunction(torch.autograd.Function):
    """``x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T``, in the dtype autocast would use
    (``x``'s own without autocast). ``drop`` is what :meth:`DropoutDrawer.draw` drew, or None
    for no dropout; ``dropout(x)`` is ``x`` with the dropped elements zeroed, times
    ``drop_scale``. Saves ``x``, ``drop`` and the rank-sized ``h = dropout(x) @ A.T``."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, drop, drop_scale, scaling):  # noqa: D102
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(dtype)
            out = torch.nn.functional.linear(
                xs, weight.to(dtype), None if bias is None else bias.to(dtype)
            )
            dropped = xs if drop is None else without_dropped(x, dtype, drop)
            h = dropped @ a.to(dtype).T
            if drop is not None:
                h.mul_(drop_scale)
            rows = out.view(-1, out.shape[-1])
            rows.addmm_(h.view(-1, h.shape[-1]), b.to(dtype).T, alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, drop, h)
        ctx.dtype, ctx.drop_scale, ctx.scaling = dtype, drop_scale, scaling
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight, a, b, drop, h = ctx.saved_tensors
        dtype, need = ctx.dtype, ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * 8
        with torch.autocast(x.device.type, enabled=False):
            g = grad.to(dtype).reshape(-1, grad.shape[-1])
            h = h.reshape(-1, h.shape[-1])
            g_h = (g @ b.to(dtype)).mul_(ctx.scaling)  # d loss / d h
            if need[4]:
                grads[4] = (g.T @ h).mul_(ctx.scaling).to(b.dtype)
            if drop is not None:
                g_h.mul_(ctx.drop_scale)  # now d loss / d (x with the dropped elements zeroed)
            if need[3]:
                xs = x.to(dtype) if drop is None else without_dropped(x, dtype, drop)
                grads[3] = (g_h.T @ xs.reshape(-1, x.shape[-1])).to(a.dtype)
            if need[0]:
                if drop is None:
                    grad_x = g @ weight.to(dtype)
                    grad_x.addmm_(g_h, a.to(dtype))
                else:
                    grad_x = zero_dropped_(g_h @ a.to(dtype), drop)
                    grad_x.addmm_(g, weight.to(dtype))
                grads[0] = grad_x.view(x.shape).to(x.dtype)
            if need[1]:
                grads[1] = (g.T @ x.to(dtype).reshape(-1, x.shape[-1])).to(weight.dtype)
            if need[2] and ctx.bias_dtype is not None:
                grads[2] = g.sum(0).to(ctx.bias_dtype)
        return tuple(grads)


def without_dropped(x: torch.Tensor, dtype: torch.dtype, drop: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``x`` in ``dtype`` with the elements ``drop`` names zeroed (not rescaled)."""
    if drop.dtype == torch.bool:  # the mask of the elements kept
        return x.to(dtype) * as_bytes(drop)
    out = x.to(dtype, memory_format=torch.contiguous_format, copy=True)
    return zero_dropped_(out, drop)


def zero_dropped_(t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the elements ``drop`` names of the contiguous ``t``, which holds the
    dropout input's elements in their order (its shape, or that flattened to rows)."""
    if drop.dtype == torch.bool:
        return t.mul_(as_bytes(drop).view(t.shape))
    t.view(-1).index_fill_(0, drop, 0)
    return t


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask viewed as 0/1 bytes: torch multiplies a float tensor by bytes faster
    than by booleans (both are converted to the float's dtype first).
    (measured: docs/performance.md, "Measurements behind design choices")"""
    return mask.view(torch.uint8)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on ``x`` in (``x``'s own without autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
