"""The precision a run trains in: bf16 only where the hardware makes it faster, or a warning."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from instruct.config import Precision
from instruct.hardware import Probe, choose_precision, cpu_flags, native_bf16_cpu, probe_matmul

CPU = torch.device("cpu")
EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
XEON_AMX = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_flags_say_which_cpus_have_native_bf16():
    assert native_bf16_cpu(cpu_flags(EPYC_AVX2)) is False
    assert native_bf16_cpu(cpu_flags(XEON_AMX)) is True
    assert native_bf16_cpu(cpu_flags(GRAVITON)) is True
    assert native_bf16_cpu(None) is None  # unknown: the probe decides


def test_the_probe_times_both_precisions():
    probe = probe_matmul(CPU, size=64, repeats=2)
    assert probe.fp32_seconds > 0 and probe.bf16_seconds > 0
    assert probe.bf16_slowdown == probe.bf16_seconds / probe.fp32_seconds


def never() -> Probe:
    raise AssertionError("probed although the flags decide")


def test_bf16_without_native_units_warns_with_the_measured_slowdown():
    slow = Probe(fp32_seconds=0.001, bf16_seconds=0.0068)
    chosen, warning = choose_precision(Precision.bf16, CPU, lambda: slow, cpu_flags(EPYC_AVX2))
    assert chosen == Precision.bf16  # kept as asked ...
    assert warning is not None and "6.8x" in warning and "trainer.precision=fp32" in warning
    # ... and nothing to say where bf16 is native, or measured faster.
    assert choose_precision(Precision.bf16, CPU, never, cpu_flags(XEON_AMX)) == (
        Precision.bf16, None)  # fmt: skip
    fast = Probe(fp32_seconds=0.002, bf16_seconds=0.001)
    assert choose_precision(Precision.bf16, CPU, lambda: fast, None) == (Precision.bf16, None)


def test_auto_takes_the_faster_precision(caplog):
    slow = Probe(fp32_seconds=0.001, bf16_seconds=0.005)
    fast = Probe(fp32_seconds=0.002, bf16_seconds=0.001)
    with caplog.at_level(logging.INFO, logger="instruct.hardware"):
        assert choose_precision(Precision.auto, CPU, lambda: slow, set()) == (Precision.fp32, None)
        assert choose_precision(Precision.auto, CPU, lambda: fast, set()) == (Precision.bf16, None)
    assert "trainer.precision=auto: fp32" in caplog.text
    # Other precisions are never probed.
    assert choose_precision(Precision.fp32, CPU, never) == (Precision.fp32, None)
    assert choose_precision(Precision.fp16, CPU, never) == (Precision.fp16, None)


@pytest.mark.slow
def test_a_run_with_auto_precision_trains_in_the_one_it_chose(toy_data, tmp_path):
    from instruct.train import train
    from tests.conftest import toy_config

    cfg = toy_config(toy_data, tmp_path, "trainer.precision=auto", "trainer.max_steps=2",
                     "trainer.eval_every=2", "logger=none", "lora=default")  # fmt: skip
    results = train(cfg)
    assert results["precision"] in ("fp32", "bf16")
    assert math.isfinite(results["best_val_loss"])
