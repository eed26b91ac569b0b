"""The fused output layer + cross-entropy gives the loss and gradients of the plain head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instruct.data.batching import pack
from instruct.kernels.fused_ce import linear_cross_entropy
from instruct.loss import loss_sum
from instruct.validation import to_device
from tests.kernels.tiny import tiny


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_linear_cross_entropy_equals_the_plain_one(bias, weight_trains):
    check_chunked_linear_cross_entropy(bias, weight_trains, "cpu", loss_rtol=1e-6, tolerance=1e-5)


def check_chunked_linear_cross_entropy(
    bias: bool, weight_trains: bool, device: str, loss_rtol: float, tolerance: float
) -> None:
    """Chunked against ``cross_entropy(linear(...))`` on ``device``: the loss within
    ``loss_rtol`` (relative), each gradient within ``tolerance`` of its largest element."""
    chunk = 3 * 50  # 3 rows a chunk, uneven end
    g = torch.Generator().manual_seed(0)

    def made(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    hidden = made(10, 16, grad=True)
    weight = made(50, 16, grad=weight_trains)
    b = made(50, grad=True) if bias else None
    targets = torch.randint(0, 50, (10,), generator=g).to(device)
    inputs = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]

    plain = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    plain_grads = torch.autograd.grad(3 * plain, inputs)
    chunked = linear_cross_entropy(hidden, weight, b, targets, chunk_elements=chunk)
    chunked_grads = torch.autograd.grad(3 * chunked, inputs)
    assert torch.allclose(chunked, plain, rtol=loss_rtol)
    for x, y in zip(chunked_grads, plain_grads, strict=True):
        assert (x - y).abs().max() <= tolerance * y.abs().max()
    with torch.no_grad():
        again = linear_cross_entropy(hidden, weight, b, targets, chunk_elements=chunk)
        assert torch.allclose(again, plain, rtol=max(1e-5, loss_rtol))


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["lora=none", "lora=default"])
def test_fused_loss_gives_the_loss_and_gradients_of_the_plain_head(lora):
    """Full fine-tuning trains the tied head/embedding through the fused loss too."""
    check_fused_loss_on_the_tiny_model(lora, "cpu", tolerance=1e-5)


def check_fused_loss_on_the_tiny_model(lora: str, device: str, tolerance: float) -> None:
    """The tiny model's summed loss and gradients with the fused loss and without, on
    ``device``: the loss within ``tolerance`` (relative), each gradient within
    ``tolerance`` of its largest element."""
    _, model, _, features = tiny(lora, "lora.dropout=0")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    row = to_device(pack(features), device)
    results = []
    for fused in (False, True):
        model.zero_grad()
        loss, n = loss_sum(model, row, fused)
        loss.backward()
        results.append((loss.detach(), n, [p.grad.clone() for p in params]))
    (plain, n_plain, g_plain), (fused, n_fused, g_fused) = results
    assert n_plain == n_fused and torch.allclose(fused, plain, rtol=tolerance)
    for x, y in zip(g_fused, g_plain, strict=True):
        assert (x - y).abs().max() <= tolerance * y.abs().max()


def test_fused_loss_under_bf16_autocast_tracks_fp32():
    check_fused_loss_under_bf16_autocast("cpu")


def check_fused_loss_under_bf16_autocast(device: str) -> None:
    """Under bf16 autocast on ``device`` the fused loss is fp32 and within 1% of the plain
    bf16 loss and of the fp32 one."""
    _, model, _, features = tiny("lora=none")
    model.to(device)
    row = to_device(pack(features), device)
    with torch.no_grad():
        fp32, _ = loss_sum(model, row, fused=False)
        with torch.autocast(device, dtype=torch.bfloat16):
            plain, _ = loss_sum(model, row, fused=False)
            fused, _ = loss_sum(model, row, fused=True)
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(plain.item(), rel=1e-2)
    assert fused.item() == pytest.approx(fp32.item(), rel=1e-2)
