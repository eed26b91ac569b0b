"""Sources -> examples, and mixtures of sources -> train and validation splits.

A :class:`Source` is one or more locations read with the same column mapping and system
prompt. ``data=file`` and ``data=hf`` are one source split with the run's seed, as before
mixtures existed; ``data=mixture`` splits each source apart with a seed made from the run's
seed and the source's label, so appending a source never moves another's examples between
train and validation.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from instruct.data.readers import BATCH_ROWS, Location, read_batches
from instruct.data.records import DataError, Example, normalise, with_system

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Locations read alike: one column mapping, one system prompt, one label.

    ``label`` is set on each example as ``"source"`` (mixtures only; a single source leaves
    its examples without it), so the trainer can count each source's examples apart.
    """

    locations: tuple[Location, ...]
    columns: Mapping[str, str] = field(default_factory=dict)
    system: str | None = None
    label: str | None = None

    def batches(self, rows: int = BATCH_ROWS) -> Iterator[list[Example]]:
        """Normalised examples, a reader's batch at a time, each with its ``where``."""
        columns, system, label = dict(self.columns), self.system, self.label
        for loc in self.locations:
            for batch in read_batches(loc, rows):
                out = []
                for where, record in batch:
                    example = with_system(normalise(record, where, columns), system)
                    example["where"] = where
                    if label is not None:
                        example["source"] = label
                    out.append(example)
                yield out

    def examples(self) -> list[Example]:
        return [e for batch in self.batches() for e in batch]


def fmt_name(value: Any) -> str:
    """A config's format (an Enum member from a structured config, or a plain string)."""
    return value.value if isinstance(value, Enum) else str(value)


def location_of(cfg: Any, split: str | None = None) -> Location:
    """The location a data or source config names (``split`` instead of its own, if given)."""
    return Location(
        str(cfg.path),
        fmt_name(cfg.get("format", "auto")),
        cfg.get("name"),
        split or cfg.get("split") or "train",
        cfg.get("revision"),
    )


def file_source(paths: Iterable[str], cfg: Any) -> Source:
    fmt = fmt_name(cfg.get("format", "auto"))
    return Source(tuple(Location(str(p), fmt) for p in paths), dict(cfg.get("columns") or {}))


def seed_for(seed: int, label: str, purpose: str) -> int:
    """A seed of its own for one source: from the run's seed and the source's label only."""
    digest = hashlib.sha256(f"{seed}\0{purpose}\0{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split(
    examples: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic shuffle from ``seed``, then the first ``val_fraction`` is validation."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if len(examples) < 2:
        raise DataError(f"need at least 2 examples to split train/validation, got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(len(examples) * val_fraction)))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def draw(examples: Sequence[Example], weight: float, replacement: bool, seed: int) -> list[Example]:
    """``round(weight x len)`` examples: whole passes and a seeded subset of the rest
    (without replacement), or that many seeded draws with replacement."""
    n = round(len(examples) * weight)
    if weight == 1.0 and not replacement:
        return list(examples)
    rng = random.Random(seed)
    if replacement:
        return [examples[rng.randrange(len(examples))] for _ in range(n)]
    passes, rest = divmod(n, len(examples))
    subset = sorted(rng.sample(range(len(examples)), rest))
    return list(examples) * passes + [examples[i] for i in subset]


def select_domains(
    examples: list[Example], domains: Iterable[str] | None, origin: str = "this data"
) -> list[Example]:
    """The examples of the wanted ``domains`` (all when none); ``origin`` names the data."""
    if not domains:
        return examples
    wanted = list(domains)
    known = sorted({e.get("domain") for e in examples if e.get("domain")})
    unknown = [d for d in wanted if d not in known]
    if unknown:
        raise DataError(f"data.domains: unknown domain(s) {unknown}; {origin} has {known}")
    return [e for e in examples if e.get("domain") in wanted]


# ---------------------------------------------------------------- mixtures


@dataclass
class Part:
    """One mixture source as loaded: its config, label and examples before the split."""

    index: int
    cfg: Any
    label: str
    source: Source
    examples: list[Example]


def mixture_parts(cfg: Any) -> list[Part]:
    if not cfg.sources:
        raise DataError(
            "data.sources: no source given; e.g. "
            "data.sources=[{path: a.parquet},{path: b.jsonl, weight: 2}]"
        )
    parts, seen = [], {}
    for i, s in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        check_source(s, key)
        loc = location_of(s)
        label = str(s.label or loc.label())
        if label in seen:
            raise DataError(
                f"{key}: label {label!r} is already data.sources[{seen[label]}]'s; give one "
                "of them a label of its own (the label seeds its split)"
            )
        seen[label] = i
        source = Source((loc,), dict(s.columns or {}), s.system, label)
        parts.append(Part(i, s, label, source, source.examples()))
    return parts


def check_source(s: Any, key: str) -> None:
    rules = [
        ("weight", s.weight > 0, "positive"),
        ("max_examples", s.max_examples is None or s.max_examples >= 1, "null or at least 1"),
        (
            "val_fraction",
            s.val_fraction is None or 0 <= s.val_fraction < 1,
            "null or in [0, 1)",
        ),
    ]
    bad = [f"{key}.{k} must be {want}, got {s[k]!r}" for k, ok, want in rules if not ok]
    if s.val_path and s.val_split:
        bad.append(f"{key}: val_path and val_split both set; choose one")
    if bad:
        raise DataError("; ".join(bad))


def mixture_splits(cfg: Any, seed: int) -> tuple[list[Example], list[Example]]:
    """Train and validation examples of ``data=mixture``: each source split apart."""
    parts = mixture_parts(cfg)
    if cfg.domains:
        union = [e for p in parts for e in p.examples if e.get("domain")]
        select_domains(union, cfg.domains, "data.sources")  # unknown domains: an error
    train: list[Example] = []
    val: list[Example] = []
    for p in parts:
        n, t, v = source_split(p, cfg, seed)
        log.info(
            "data source %s: %d examples -> %d train (weight %g%s), %d validation",
            p.label, n, len(t), p.cfg.weight, ", with replacement" if p.cfg.replacement else "",
            len(v),
        )  # fmt: skip
        train += t
        val += v
    if not val:
        raise DataError("data.sources: no validation example (every source has val_fraction 0)")
    return train, val


def source_split(p: Part, cfg: Any, seed: int) -> tuple[int, list[Example], list[Example]]:
    """One source's example count (after domains and its cap), train (weighted) and
    validation examples."""
    s, key = p.cfg, f"data.sources[{p.index}] ({p.label})"
    wanted = set(cfg.domains or ())
    examples = [e for e in p.examples if not wanted or e.get("domain") in wanted]
    cap = s.max_examples if s.max_examples is not None else cfg.max_examples
    if cap is not None:
        examples = examples[:cap]
    if not examples:
        raise DataError(f"{key}: no example left after data.domains and max_examples")
    if s.val_path or s.val_split:
        loc = location_of(s, s.val_split)
        if s.val_path:
            loc = Location(str(s.val_path), loc.format, loc.name, loc.split, loc.revision)
        val_source = Source((loc,), p.source.columns, s.system, p.label)
        val = [e for e in val_source.examples() if not wanted or e.get("domain") in wanted]
        train = examples
    else:
        fraction = s.val_fraction if s.val_fraction is not None else cfg.val_fraction
        if fraction == 0:
            train, val = examples, []
        else:
            try:
                train, val = split(examples, fraction, seed_for(seed, p.label, "split"))
            except DataError as e:
                raise DataError(f"{key}: {e}") from e
    weighted = draw(train, s.weight, s.replacement, seed_for(seed, p.label, "weight"))
    return len(examples), weighted, val
