"""What a dropout of rate ``p`` drops, drawn anew each call: as a mask or as positions.

A :class:`DropoutDrawer` owns the threads CPU masks are drawn on; the fused LoRA layers of a
model share one (:func:`instruct.kernels.fused_lora.fuse_lora`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from instruct.config import DropoutDraw

# Below this rate the CPU draws dropout as the positions of the dropped elements; at this rate
# both ways took the same time in LoRA layers, forward and backward.
# (measured: docs/performance.md, "Measurements behind design choices")
POSITIONS_BELOW = 0.2


class DropoutDrawer:
    """Draws dropout the way ``how`` names (``lora.dropout_draw``), on threads it owns.

    The pool of threads is made on the first CPU mask and again when torch's thread count
    changes; it is not copied with the drawer (a copied model draws on threads of its own).
    """

    def __init__(self, how: str = "auto") -> None:
        self.how = DropoutDraw(how)
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"how": self.how}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["how"])

    def draw(self, shape: torch.Size, p: float, device: Any) -> torch.Tensor:
        """What a dropout of rate ``p`` drops from an input of ``shape``, drawn anew.

        Either a boolean mask of the elements kept (:meth:`keep_mask`), or, on the CPU, the
        sorted positions of the dropped elements in the input's flattened order
        (:meth:`dropped_positions`). At ``p = 0.05`` positions are a twentieth of the
        elements: fewer random numbers, less memory kept for the backward pass, and they are
        applied by zeroing those elements of a copy rather than by multiplying every element
        by a mask. ``how``: ``mask``, ``positions`` (a mask all the same on GPUs), or
        ``auto``: positions on the CPU when ``p`` is below :data:`POSITIONS_BELOW`. Either way
        each element is dropped independently with probability ``p``, and torch's seed fixes
        the draw.
        """
        how = self.how
        cpu = torch.device(device).type == "cpu"
        if cpu and (
            how is DropoutDraw.positions or (how is DropoutDraw.auto and p < POSITIONS_BELOW)
        ):
            return self.dropped_positions(math.prod(shape), p)
        return self.keep_mask(shape, p, device)

    def keep_mask(self, shape: torch.Size, p: float, device: Any) -> torch.Tensor:
        """A boolean dropout mask: each element ``True`` with probability ``1 - p``.

        torch draws CPU random numbers on one core however many it has, and LoRA draws a mask
        for the input of every adapted layer (a sizeable share of a LoRA step on the CPU). On
        the CPU every thread fills its share from its own generator, seeded from torch's
        global one, so a seed still fixes every mask and a checkpoint of torch's RNG state
        fixes the rest of a run.
        (measured: docs/performance.md, "Measurements behind design choices")
        """
        if torch.device(device).type != "cpu":
            return torch.rand(shape, device=device) >= p
        return self.parallel_keep_mask(shape, p)

    def pool(self, threads: int) -> ThreadPoolExecutor:
        """This drawer's pool of ``threads`` threads."""
        if self._pool is None or self._threads != threads:
            self._pool, self._threads = ThreadPoolExecutor(threads), threads
        return self._pool

    def parallel_keep_mask(
        self, shape: torch.Size, p: float, min_share: int = 1 << 16
    ) -> torch.Tensor:
        """A CPU dropout mask drawn in shares by up to torch's thread count, each share by its
        own NumPy SFC64 generator: 32 random bits an element, kept when they are at least
        ``p * 2**32`` (torch's float ``uniform_`` has 24 bits, and SFC64 draws faster).
        (measured: docs/performance.md, "Measurements behind design choices")"""
        import numpy as np

        threads = torch.get_num_threads()
        pool = self.pool(threads)
        keep = torch.empty(shape, dtype=torch.bool)
        flat = keep.view(-1).numpy()
        count = max(1, min(threads, flat.size // min_share))
        edges = np.linspace(0, flat.size, count + 1).astype(np.int64)
        seed = int(torch.randint(0, 1 << 62, (1,)))
        threshold = round(p * 2**32)

        def fill(i: int) -> None:
            bits = np.random.Generator(np.random.SFC64([seed, i]))
            share = bits.integers(0, 1 << 32, edges[i + 1] - edges[i], dtype=np.uint32)
            np.greater_equal(share, threshold, out=flat[edges[i] : edges[i + 1]])

        list(pool.map(fill, range(count)))
        return keep

    @staticmethod
    def dropped_positions(n: int, p: float, batch: int | None = None) -> torch.Tensor:
        """The sorted positions, in ``range(n)``, of the elements a dropout of rate ``p``
        drops: each independently with probability ``p``, from a NumPy SFC64 generator seeded
        from torch's global one.

        Drawn as the gaps between dropped elements, which are geometric: ``floor(E / rate) +
        1`` with ``E`` standard exponential and ``rate = -log(1 - p)``. That is about
        ``n * p`` random numbers rather than ``n``, drawn ``batch`` at a time (by default
        enough for all but a 6-sigma excess). One thread: drawing in two shares on two
        threads was no faster, and NumPy's geometric sampler is slower than these
        exponentials. (measured: docs/performance.md, "Measurements behind design choices")
        """
        import numpy as np

        bits = np.random.Generator(np.random.SFC64(int(torch.randint(0, 1 << 62, (1,)))))
        rate = -math.log1p(-p)
        if batch is None:
            expected = n * p
            batch = int(expected + 6 * math.sqrt(expected * (1 - p)) + 16)
        parts, last = [np.empty(0, dtype=np.int64)], -1
        while last < n - 1:
            gaps = bits.standard_exponential(batch)
            gaps /= rate
            found = gaps.astype(np.int64)
            found += 1
            np.cumsum(found, out=found)
            found += last
            parts.append(found)
            last = int(found[-1])
        found = np.concatenate(parts)
        return torch.from_numpy(found[: np.searchsorted(found, n)])
