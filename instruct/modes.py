"""A model switched to eval mode for a block, and back to the mode it was in afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def evaluating(model: Any) -> Iterator[Any]:
    """``model`` in eval mode (no dropout) inside the block; afterwards in training mode again
    if it was, even when the block raised."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
