"""Example IDs and reviewed files: the examples a person left out of training.

Every example has a stable ID: its own ``"id"`` when the record has one, else a hash of its
content (``h-`` and 16 hex digits of SHA-256 over its keys but ``where``, ``source`` and
``id``), so moving a file, or mixing it with others, keeps each example's ID. The page
``python -m instruct.inspect`` writes saves a reviewed file (:data:`REVIEW_FORMAT`: the
accepted and the rejected IDs); ``data.exclude_ids`` names such a file, or lists IDs, and
:func:`exclude` leaves those examples out of both splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from instruct.data.records import DataError, Example

log = logging.getLogger(__name__)

REVIEW_FORMAT = "instruct-review"  # the "format" of a reviewed file the page saves
NOT_CONTENT = ("where", "source", "id")  # where an example sits is not what it says


def example_id(example: Example) -> str:
    """The example's ``"id"``, else a hash of its content (the same wherever it is read)."""
    given = example.get("id")
    if given is not None and str(given) != "":
        return str(given)
    content = {k: v for k, v in example.items() if k not in NOT_CONTENT}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return "h-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_reviewed(path: Path) -> list[str]:
    """The rejected IDs of a reviewed file: the page's JSON (``{"format":
    "instruct-review", "accepted": [...], "rejected": [...]}``) or a JSON list of IDs.

    A file that is neither is a :class:`DataError` naming it.
    """
    if not path.is_file():
        raise DataError(f"data.exclude_ids: {path} does not exist")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"data.exclude_ids: {path}: not a JSON file ({err})") from None
    ids = value.get("rejected") if isinstance(value, dict) else value
    if isinstance(value, dict) and value.get("format") != REVIEW_FORMAT:
        raise DataError(
            f'data.exclude_ids: {path}: expected a reviewed file ({{"format": '
            f'"{REVIEW_FORMAT}", "rejected": [...]}}) or a JSON list of IDs'
        )
    if not isinstance(ids, list) or not all(isinstance(i, str | int) for i in ids):
        raise DataError(f"data.exclude_ids: {path}: the rejected IDs must be a list of strings")
    return [str(i) for i in ids]


def excluded_ids(value: Any) -> set[str] | None:
    """``data.exclude_ids`` as a set of IDs: a list of IDs, or the path of a reviewed file
    (:func:`read_reviewed`); None leaves every example in."""
    if value is None:
        return None
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, str | Path):
        return set(read_reviewed(Path(value)))
    if isinstance(value, list) and all(isinstance(i, str | int) for i in value):
        return {str(i) for i in value}
    raise DataError(
        f"data.exclude_ids: expected a list of IDs or a reviewed file's path, got {value!r}"
    )


def exclude(splits: Sequence[list[Example]], value: Any) -> tuple[list[Example], ...]:
    """``splits`` without the examples whose IDs ``data.exclude_ids`` (``value``) names.

    The others stay where they were: an excluded example leaves its split without
    reshuffling the rest. Logs how many were left out, and how many IDs matched nothing.
    """
    ids = excluded_ids(value)
    if ids is None:
        return tuple(splits)
    kept = tuple([e for e in split if example_id(e) not in ids] for split in splits)
    gone = [len(a) - len(b) for a, b in zip(splits, kept, strict=True)]
    unmatched = len(ids - set(all_ids(e for split in splits for e in split)))
    log.info(
        "data.exclude_ids: %d examples excluded (%s) of %d IDs listed%s",
        sum(gone),
        " / ".join(str(n) for n in gone),
        len(ids),
        f"; {unmatched} match no example" if unmatched else "",
    )
    return kept


def all_ids(examples: Iterable[Example]) -> list[str]:
    return [example_id(e) for e in examples]
