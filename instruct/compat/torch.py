"""torch's list of the devices that have fused optimizer kernels."""

from __future__ import annotations

from instruct.compat import Private, missing

REQUIRES = (Private("torch", "torch.optim.optimizer", "_get_fused_kernels_supported_devices"),)


def check() -> list[str]:
    """A message for each private name in :data:`REQUIRES` that is gone."""
    return missing(REQUIRES)


def fused_kernel_devices() -> set[str]:
    """The device types (``"cpu"``, ``"cuda"``, ...) whose parameters ``fused=True`` takes.

    Private: ``torch.optim.optimizer._get_fused_kernels_supported_devices`` is where torch
    itself looks before accepting ``fused=True``; no public function says it, and trying an
    optimizer to catch its error would hide other errors. Without it: CUDA only, the device
    every torch that has fused AdamW supports.
    """
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return {"cuda"}
    return set(_get_fused_kernels_supported_devices())
