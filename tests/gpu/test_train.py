"""Training on CUDA: a bf16 run tracks the fp32 run (the CPU test's check,
tests/kernels/test_memory.py, on the GPU), and ``python -m instruct.run model=tiny`` trains and
saves on the GPU.

Tolerance: every training loss and the final validation loss of bf16 within 2% of fp32's.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_module
from tests.kernels.test_memory import check_bf16_run_tracks_the_fp32_run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("lora", ["lora=default", "lora=none"])
def test_bf16_run_on_cuda_tracks_the_fp32_run(toy_data, tmp_path, lora):
    torch.cuda.reset_peak_memory_stats()
    check_bf16_run_tracks_the_fp32_run(toy_data, tmp_path, lora)
    assert torch.cuda.max_memory_allocated() > 0  # Accelerate put the runs on the GPU


def test_the_tiny_run_trains_on_cuda(tmp_path):
    args = ["model=tiny", "trainer.max_steps=3", "trainer.eval_every=1", "data.domains=[math]",
            "logger=none", "trainer.samples=1", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = run_module("instruct.run", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["environment"]["gpu_count"] >= 1
    assert len(results["train_loss_history"]) == 3
    assert all(loss == loss for _, loss in results["train_loss_history"])  # no NaN
    assert (tmp_path / "run" / "checkpoints" / "best").is_dir()
