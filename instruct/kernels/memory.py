"""Memory switches that change no number: the frozen base in bf16, glibc keeping freed memory
for the next step (``trainer.keep_freed_memory``), no cyclic garbage collection while many
small objects are built."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def cast_frozen(model: Any, dtype: torch.dtype) -> int:
    """Store frozen linear weights in ``dtype``; return how many parameters changed.

    Under bf16 autocast every matmul reads its weight in bf16 anyway, so keeping the frozen
    base there gives the same results in half the memory. Trainable weights stay fp32 (the
    master copy the optimizer updates), and so do embeddings and norms, which keep the
    residual stream in fp32.
    """
    modules = list(model.modules())
    # A head tied to the input embeddings shares their weight: it stays fp32 with them.
    embeddings = {id(m.weight) for m in modules if isinstance(m, torch.nn.Embedding)}
    changed = 0
    for module in modules:
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and id(weight) not in embeddings:
            if weight.requires_grad or any(p.requires_grad for p in module.parameters()):
                continue
            if weight.dtype != dtype and weight.is_floating_point():
                module.to(dtype)
                changed += weight.numel()
    return changed


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; whether it applied.

    By default glibc serves every allocation above 128 KiB with its own ``mmap`` and returns
    it on free, so each training step's activations (gigabytes) fault in fresh zeroed pages,
    a noticeable share of a LoRA step on the CPU. With a high mmap threshold and no trimming,
    a step reuses the previous step's memory. The peak is the same; the memory is just not
    handed back between steps. Not glibc (macOS, Windows, musl): nothing to do.
    (measured: docs/performance.md, "Measurements behind design choices")
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    applied = any(libc.mallopt(m_mmap_threshold, size) == 1 for size in (1 << 30, 1 << 25))
    return applied and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block.

    Building tens of thousands of small objects (messages, rendered texts, a stream's
    batches) triggers full collections, and each walks every object the process holds, which
    with torch and transformers loaded is a sizeable share of building a split. Nothing built
    there forms reference cycles, so nothing is left for the collector to find.
    (measured: docs/performance.md, "Measurements behind design choices")
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
