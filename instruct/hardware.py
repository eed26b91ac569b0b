"""Which precision this machine computes fastest, asked once at the start of a run.

bf16 halves the memory traffic of a matmul, but only hardware with bf16 units makes it
faster: GPUs from Ampere on, CPUs with AVX512_BF16 or AMX (x86) or BF16 (Arm). Elsewhere
PyTorch emulates bf16 matmuls, several times slower than fp32. ``trainer.precision=bf16`` on
such a CPU warns with the measured ratio; ``trainer.precision=auto`` takes whichever a short
timed probe (:func:`probe_matmul`, well under a second) finds faster.
"""

from __future__ import annotations

import logging
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from instruct.config import Precision

log = logging.getLogger(__name__)

# CPU flags (Linux /proc/cpuinfo) that mean native bf16 matmuls.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
PROBE_SIZE = 256  # an emulated bf16 matmul of this size takes tens of milliseconds


@dataclass(frozen=True)
class Probe:
    """Median seconds of one fp32 and one bf16 matmul of the same size."""

    fp32_seconds: float
    bf16_seconds: float

    @property
    def bf16_slowdown(self) -> float:
        """How many times longer bf16 takes than fp32 (below 1: bf16 is faster)."""
        return self.bf16_seconds / self.fp32_seconds


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags (lower case), or None where the OS does not list them."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if path.is_file():
            cpuinfo = path.read_text(errors="replace")
        elif platform.system() == "Darwin":
            return mac_flags()
        else:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86, Arm
            flags.update(value.lower().split())
    return flags


def mac_flags() -> set[str] | None:
    """Apple silicon's BF16 feature (M2 and later), as a flag, from sysctl."""
    try:
        done = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
                              capture_output=True, text=True, timeout=5)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"bf16"} if done.stdout.strip() == "1" else set()


def native_bf16_cpu(flags: set[str] | None) -> bool | None:
    """Whether the CPU has bf16 matmul units; None when its flags are unknown."""
    return None if flags is None else bool(flags & NATIVE_BF16_FLAGS)


def probe_matmul(device: str | torch.device = "cpu", size: int = PROBE_SIZE,
                 repeats: int = 5) -> Probe:  # fmt: skip
    """Time fp32 and bf16 matmuls of ``size`` x ``size`` on ``device`` (medians)."""

    def median_seconds(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    return Probe(median_seconds(torch.float32), median_seconds(torch.bfloat16))


def choose_precision(
    requested: Precision,
    device: torch.device,
    probe: Callable[[], Probe] | None = None,
    flags: set[str] | None = None,
) -> tuple[Precision, str | None]:
    """The precision to train in for ``trainer.precision=requested``, and a warning or None.

    ``auto``: on CUDA bf16 when the card supports it, else fp32; on a CPU, whichever the
    probe finds faster; elsewhere (Apple MPS, ...) fp32. ``bf16`` on a CPU without native
    bf16 is kept, with a warning naming the measured slowdown. ``probe`` and ``flags`` are
    this machine's unless given.
    """
    if requested not in (Precision.auto, Precision.bf16):
        return requested, None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision.bf16, None
        if requested == Precision.bf16:
            return requested, "trainer.precision=bf16: this GPU has no bf16 support"
        return Precision.fp32, None
    if device.type != "cpu":
        return (Precision.fp32 if requested == Precision.auto else requested), None
    native = native_bf16_cpu(cpu_flags() if flags is None else flags)
    if requested == Precision.bf16 and native:
        return requested, None
    measured = (probe or (lambda: probe_matmul(device)))()
    faster = Precision.bf16 if measured.bf16_slowdown < 1 else Precision.fp32
    if requested == Precision.auto:
        log.info("trainer.precision=auto: %s (a bf16 matmul took %.2fx the time of fp32 here)",
                 faster.value, measured.bf16_slowdown)  # fmt: skip
        return faster, None
    if faster == Precision.bf16:
        return requested, None
    return requested, (
        f"trainer.precision=bf16: this CPU has no native bf16 matmuls (no AVX512_BF16, AMX "
        f"or Arm BF16), and a bf16 matmul took {measured.bf16_slowdown:.1f}x the time of an "
        "fp32 one here, so this run will be slower than in fp32: trainer.precision=fp32 (or "
        "auto) is faster on this machine"
    )
