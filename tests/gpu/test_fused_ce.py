"""On CUDA the fused output layer + cross-entropy gives the plain head's loss and gradients
(the CPU tests' checks, tests/kernels/test_fused_ce.py, on the GPU).

Tolerances: fp32 losses within 1e-5 (relative), gradients within 1e-4 of their largest
element (cuBLAS sums in other orders than the CPU; TF32 stays off, torch's default); under
bf16 autocast the fused loss within 1% of the plain bf16 loss and of the fp32 one.
"""

from __future__ import annotations

import pytest

from tests.kernels.test_fused_ce import (
    check_chunked_linear_cross_entropy,
    check_fused_loss_on_the_tiny_model,
    check_fused_loss_under_bf16_autocast,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_linear_cross_entropy_on_cuda_equals_the_plain_one(bias, weight_trains):
    check_chunked_linear_cross_entropy(bias, weight_trains, "cuda", loss_rtol=1e-5, tolerance=1e-4)


@pytest.mark.parametrize("lora", ["lora=none", "lora=default"])
def test_fused_loss_on_cuda_gives_the_loss_and_gradients_of_the_plain_head(lora):
    check_fused_loss_on_the_tiny_model(lora, "cuda", tolerance=1e-4)


def test_fused_loss_under_cuda_bf16_autocast_tracks_fp32():
    check_fused_loss_under_bf16_autocast("cuda")
