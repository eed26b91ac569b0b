"""The output layer and the summed cross-entropy in one pass over chunks of rows
(``trainer.fused_loss``): the gradients are formed on the spot, so the ``rows x vocabulary``
logits, their log-softmax and their gradient never exist at full size."""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in fp32


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")``, chunked; with
    ``row_weights``, each row's loss (and so its gradient) scaled by its weight. A chunk is
    as many rows as hold ``chunk_elements`` logits (one row at least)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    grads = torch.is_grad_enabled()  # False under no_grad: evaluation forms no gradients
    return LinearCrossEntropy.apply(
        hidden, weight, bias, targets, dtype, grads, row_weights, chunk_elements
    )


class LinearCrossEntropy(torch.autograd.Function):
    """Output layer + summed cross-entropy whose backward was done during the forward.

    For each chunk of rows: logits (in the autocast dtype, if any), a float32 log-sum-exp,
    the loss, and ``softmax - onehot``, from which the gradients of the hidden rows and of
    the weight (when it trains, e.g. tied embeddings in full fine-tuning) are accumulated.
    Backward only scales them by the incoming gradient.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx,
        hidden,
        weight,
        bias,
        targets,
        dtype,
        grads,
        row_weights=None,
        chunk_elements=CHUNK_ELEMENTS,
    ):
        compute = dtype or hidden.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute)
            b = bias.to(torch.float32) if bias is not None else None
            need = ctx.needs_input_grad if grads else (False, False, False)
            grad_hidden = torch.empty_like(hidden) if need[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need[2] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            step = max(1, chunk_elements // weight.shape[0])
            for start in range(0, hidden.shape[0], step):
                h = hidden[start : start + step].to(compute)
                y = targets[start : start + step]
                logits = (h @ w.T).float()
                if b is not None:
                    logits += b
                picked = logits.gather(1, y[:, None]).squeeze(1)
                # One pass of exp, in place over the logits: no temporary of their size.
                peak = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(peak).exp_()
                norm = probs.sum(dim=-1, keepdim=True)
                losses = norm.log() + peak - picked[:, None]
                r = None if row_weights is None else row_weights[start : start + step, None]
                total += (losses if r is None else losses * r).sum()
                if grad_hidden is None and grad_weight is None and grad_bias is None:
                    continue
                # d(loss)/d(logits) = softmax - onehot, formed in place (times the weight).
                probs.div_(norm)
                probs[torch.arange(len(y), device=y.device), y] -= 1
                if r is not None:
                    probs.mul_(r)
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
                g = probs.to(compute)
                if grad_hidden is not None:
                    rows = grad_hidden[start : start + step]
                    if rows.dtype == compute:
                        torch.mm(g, w, out=rows)
                    else:
                        rows.copy_(g @ w)
                if grad_weight is not None:
                    grad_weight += (g.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_output.float()
        return (
            (grad_hidden * scale.to(grad_hidden.dtype)) if grad_hidden is not None else None,
            (grad_weight * scale).to(weight_dtype) if grad_weight is not None else None,
            (grad_bias * scale).to(bias_dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
            None,
        )
