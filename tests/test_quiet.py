"""Notices users cannot act on stay off the screen; other messages still show."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import warnings

import pytest
import torch

from instruct.config import compose
from instruct.model import apply_lora, build_model
from instruct.quiet import DEEPSPEED_LOGGER, not_deepspeed_cpu_notice


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed says nothing with CUDA")
def test_importing_the_trainer_prints_no_deepspeed_cpu_notice():
    code = "import instruct.train, deepspeed.accelerator as a; a.get_accelerator()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)  # fmt: skip
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr


def test_only_that_notice_is_dropped():
    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord(DEEPSPEED_LOGGER, logging.WARNING, "x.py", 1, msg, None, None)

    assert not not_deepspeed_cpu_notice(record("Setting accelerator to CPU. If you have GPU"))
    assert not_deepspeed_cpu_notice(record("ZeRO: out of memory"))
    assert not_deepspeed_cpu_notice in logging.getLogger(DEEPSPEED_LOGGER).filters


def test_adding_lora_warns_nothing():
    cfg = compose(["model=tiny", "lora=default"])
    model, _ = build_model(cfg.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model, cfg.lora, [])
    assert [str(w.message) for w in caught] == []
