"""Progress bars for the long steps: one look, with a rate and an ETA, on one process.

A bar appears only once its work has taken :data:`SHOW_AFTER` seconds, so quick steps print
nothing, and only on a terminal (tqdm's own check), so logs and captured output stay clean.
Every process but the main one keeps quiet. ``INSTRUCT_PROGRESS=0`` turns every bar off,
``=1`` shows them even when standard error is not a terminal.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

SHOW_AFTER = 1.0  # seconds


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    main: bool = True,
    leave: bool = False,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or one updated by hand, with ``total``)."""
    wanted = os.environ.get("INSTRUCT_PROGRESS")
    disable: bool | None = None if wanted is None else wanted == "0"
    return tqdm(iterable, desc=desc, total=total, unit=unit, delay=SHOW_AFTER, leave=leave,
                dynamic_ncols=True, disable=disable if main else True)  # fmt: skip
