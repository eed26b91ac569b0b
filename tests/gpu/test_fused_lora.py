"""On CUDA the fused LoRA layer gives peft's outputs and gradients (the CPU test's check,
tests/kernels/test_fused_lora.py, on the GPU).

Tolerances: fp32 within 1e-4 of each tensor's largest element (cuBLAS sums in other orders
than the CPU and than peft's separate matmuls; TF32 stays off, torch's default); bf16 no
further from peft's fp32 figures than twice peft's own bf16 error plus 1e-3 of the scale, as
on the CPU. On the GPU every dropout draw is a mask.
"""

from __future__ import annotations

import pytest

from tests.kernels.test_fused_lora import check_fused_lora_layer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("p, draw", [(0.0, "auto"), (0.25, "mask"), (0.25, "positions")])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_layer_on_cuda_gives_peft_output_and_gradients(precision, p, draw, bias):
    check_fused_lora_layer(precision, p, draw, bias, "cuda", fp32_tolerance=1e-4)
