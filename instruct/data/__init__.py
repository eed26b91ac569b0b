"""Examples: load them from a source, check and normalise them, split train/validation.

An example is a plain dict: ``{"instruction", "input"?, "output"}`` or ``{"messages": [...]}``,
with optional ``"id"`` and ``"domain"``, and for a run's examples ``"where"`` (and in a
mixture ``"source"``). Sources are registered in :data:`SOURCES`; records come from
:mod:`instruct.data.readers` (JSON, JSONL, Parquet, CSV/TSV, saved and Hub datasets),
are checked in :mod:`instruct.data.records` and mixed in :mod:`instruct.data.sources`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from instruct.data.readers import (
    Location,
    detect_format,
    load_records,
    read_batches,
    read_records,
)
from instruct.data.records import (
    FIELD_ALIASES,
    ROLE_ALIASES,
    DataError,
    Example,
    normalise,
    with_system,
)
from instruct.data.review import example_id, exclude
from instruct.data.sources import (
    Source,
    file_source,
    location_of,
    mixture_splits,
    select_domains,
    split,
)

__all__ = [
    "FIELD_ALIASES",
    "ROLE_ALIASES",
    "TASK_TYPES",
    "DataError",
    "Example",
    "Location",
    "Source",
    "detect_format",
    "example_id",
    "load_records",
    "load_splits",
    "manual_path",
    "normalise",
    "prompt_and_reference",
    "provenance",
    "read_batches",
    "read_records",
    "select_domains",
    "split",
    "with_system",
]

# The task types the shipped manual set and test instructions cover, one "domain" each.
TASK_TYPES = (
    "general", "explanation", "code", "math", "writing", "classification", "extraction",
    "rewriting", "refusal",
)  # fmt: skip


def manual_path() -> Path:
    return Path(str(resources.files("instruct.data").joinpath("manual.jsonl")))


def load_manual(cfg: Any) -> tuple[list[Example], list[Example] | None]:
    return Source((Location(str(manual_path()), "jsonl"),)).examples(), None


def load_files(cfg: Any) -> tuple[list[Example], list[Example] | None]:
    val = file_source(cfg.val_paths, cfg).examples() if cfg.val_paths else None
    return file_source(cfg.paths, cfg).examples(), val


def load_hub(cfg: Any) -> tuple[list[Example], list[Example] | None]:
    columns = dict(cfg.columns or {})
    val = None
    if cfg.val_split:
        val = Source((location_of(cfg, cfg.val_split),), columns).examples()
    return Source((location_of(cfg),), columns).examples(), val


def load_self_instruct(cfg: Any) -> tuple[list[Example], list[Example] | None]:
    from instruct.self_instruct.generate import load_self_instruct as load  # the API client

    return load(cfg)


def self_instruct_provenance(cfg: Any) -> dict[str, Any] | None:
    from instruct.self_instruct.dataset import provenance

    return provenance(cfg)


SOURCES: dict[str, Callable[[Any], tuple[list[Example], list[Example] | None]]] = {
    "manual": load_manual,
    "file": load_files,
    "hf": load_hub,
    "self_instruct": load_self_instruct,
}
# Sources that split their own examples (each of a mixture's sources apart).
SPLITTERS: dict[str, Callable[[Any, int], tuple[list[Example], list[Example]]]] = {
    "mixture": mixture_splits,
}
# How a source's data came to be (settings, counts, usage), for the run's W&B summary.
PROVENANCE: dict[str, Callable[[Any], dict[str, Any] | None]] = {
    "self_instruct": self_instruct_provenance,
}


def provenance(cfg: Any) -> dict[str, Any] | None:
    return PROVENANCE[cfg.source](cfg) if cfg.source in PROVENANCE else None


def prompt_and_reference(example: Example) -> tuple[Example, str]:
    """The example without its last reply (what a model is asked), and that reply."""
    if "messages" in example:
        messages = example["messages"]
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        tools = {"tools": example["tools"]} if "tools" in example else {}  # the prompt has them
        return {"messages": messages[:last], **tools}, messages[last]["content"]
    return {k: example[k] for k in ("instruction", "input") if k in example}, example["output"]


def origin(cfg: Any, key: str = "paths") -> str:
    """Where a data config's examples come from, for errors: its files, else its source."""
    paths = cfg.get(key) if key in cfg else None
    if paths:
        return f"data.{key} [{', '.join(str(p) for p in paths)}]"
    if cfg.get("path"):
        split_key = "val_split" if key == "val_paths" else "split"
        return f"data.path {cfg.path}[{cfg.get(split_key)}]"
    return f"data={cfg.source}"


def load_splits(cfg: Any, seed: int) -> tuple[list[Example], list[Example]]:
    """Train and validation examples for the data config ``cfg``, without those
    ``data.exclude_ids`` names (:mod:`instruct.data.review`).

    Too few examples left after ``data.domains`` and ``data.max_examples`` is an error naming
    the files (or the source) they came from.
    """
    train, val = read_splits(cfg, seed)
    if "exclude_ids" not in cfg or cfg.exclude_ids is None:  # a config saved before the key
        return train, val
    train, val = exclude([train, val], cfg.exclude_ids)
    if not train:
        raise DataError(f"{origin(cfg)}: no training example left after data.exclude_ids")
    return train, val


def read_splits(cfg: Any, seed: int) -> tuple[list[Example], list[Example]]:
    """:func:`load_splits` before ``data.exclude_ids``."""
    if cfg.source in SPLITTERS:
        return SPLITTERS[cfg.source](cfg, seed)
    if cfg.source not in SOURCES:
        known = sorted([*SOURCES, *SPLITTERS])
        raise DataError(f"data.source: unknown source {cfg.source!r}; known: {known}")
    examples, val = SOURCES[cfg.source](cfg)
    examples = select_domains(examples, cfg.domains, origin(cfg))
    if val is not None:
        val = select_domains(val, cfg.domains, origin(cfg, "val_paths"))
    if cfg.max_examples is not None:
        examples = examples[: cfg.max_examples]
    needed = 1 if val is not None else 2  # without a validation file, 2 to split
    if len(examples) < needed:
        raise DataError(
            f"{origin(cfg)}: {len(examples)} example(s) left after data.domains and "
            f"data.max_examples; need at least {needed}"
            + ("" if val is not None else " to split train and validation")
        )
    if val is not None:
        return examples, val
    return split(examples, cfg.val_fraction, seed)
