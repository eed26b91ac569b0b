"""A split's examples as training features: each rendered with the template, tokenized with
its labels, and counted (kept, truncated, dropped, by name where dropped)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from omegaconf import DictConfig

from instruct.config import TrainOn
from instruct.data.records import Example
from instruct.data.stream import add_stats
from instruct.data.templates import plain_template, render_many, to_messages
from instruct.data.tokenize import (
    IGNORE_INDEX,
    Feature,
    PrepareStats,
    encode_flat,
    prepare,
    prepare_cached,
)
from instruct.data.turns import select
from instruct.kernels.memory import gc_paused
from instruct.model import cache_root
from instruct.progress import progress

DROPPED_NAMED = 5  # dropped examples named in the log and results.json; all are counted


@dataclass
class SplitStats(PrepareStats):
    """:class:`PrepareStats` of a split that lost examples, and the first of them by name."""

    dropped_examples: list[str] = field(default_factory=list)  # the first DROPPED_NAMED


@dataclass
class RenderedSplit:
    """A split's examples as the template renders them, before tokenizing."""

    names: list[str]  # where each came from (file.jsonl:12), for messages
    conversations: list[list[dict[str, Any]]]  # the turns trained (data.train_on)
    weights: list[list[float] | None] | None  # per-message loss weights; None: all 1
    rendered: list[Any]  # Rendered: text, trained character spans, ...


def render_split(examples: Sequence[Example], cfg: DictConfig, tokenizer: Any) -> RenderedSplit:
    """Each example rendered with the run's template, its trained turns chosen by
    ``data.train_on``: what :func:`tokenize_split` tokenizes (and ``instruct.inspect`` shows)."""
    template = plain_template(cfg.template)
    names = [example_name(examples, i) for i in range(len(examples))]
    conversations, weights = select(
        [to_messages(e, template) for e in examples],
        cfg.data.get("train_on", TrainOn.all_assistant),
        bool(cfg.data.get("train_on_prompt", False)),
        names,
    )
    try:
        rendered = render_many(conversations, template, tokenizer, weights=weights)
    except ValueError:
        for i, c in enumerate(conversations):  # the error, with the example that raised it
            try:
                render_many([c], template, tokenizer, weights=weights and [weights[i]])
            except ValueError as err:
                raise ValueError(f"{names[i]}: {err}") from err
        raise
    return RenderedSplit(names, conversations, weights, rendered)


def tokenize_split(examples, cfg: DictConfig, tokenizer) -> tuple[list[Feature], PrepareStats]:
    with gc_paused():
        split = render_split(examples, cfg, tokenizer)
        conversations, weights, rendered = split.conversations, split.weights, split.rendered
        cache = cache_root() / "tokenized" if cfg.trainer.tokenized_cache else None
        features, stats = prepare_cached(rendered, tokenizer, cfg.trainer.max_length, cache,
                                         work=prepare_in_chunks)  # fmt: skip
    if not stats.dropped:
        return features, stats
    dropped = dropped_examples(
        examples, conversations, rendered, tokenizer, cfg.trainer.max_length, weights
    )
    return features, SplitStats(**vars(stats), dropped_examples=dropped[:DROPPED_NAMED])


CHUNK = 8192  # examples tokenised at a time: a large split shows its progress


def prepare_in_chunks(
    rendered: Sequence[Any], tokenizer: Any, max_length: int, chunk: int = CHUNK
) -> tuple[list[Feature], PrepareStats]:
    """:func:`~instruct.data.tokenize.prepare` a chunk at a time, with a progress bar: the
    same features and counts (each example is tokenised on its own either way)."""
    if len(rendered) <= chunk:
        return prepare(rendered, tokenizer, max_length)
    features: list[Feature] = []
    parts = []
    with progress(desc="tokenise", total=len(rendered), unit="example") as bar:
        for start in range(0, len(rendered), chunk):
            part, stats = prepare(rendered[start : start + chunk], tokenizer, max_length)
            features += part
            parts.append(stats)
            bar.update(min(chunk, len(rendered) - start))
    return features, add_stats(parts)


def example_name(examples: Sequence[Example], i: int) -> str:
    """Where an example came from (``file.jsonl:12``), or its index in the split."""
    return str(examples[i].get("where") or f"example {i}")


def dropped_examples(
    examples: Sequence[Example],
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    rendered: Sequence[Any],
    tokenizer: Any,
    max_length: int,
    weights: Sequence[Sequence[float] | None] | None = None,
) -> list[str]:
    """The examples :func:`prepare` drops, by name: nothing to train within ``max_length``.

    One with a non-empty reply to train (``weights``: each conversation's per-message ones,
    :func:`instruct.data.turns.select`) that has no trained token even untruncated is an error,
    not a drop: its reply merged into the prompt's tokens, or the template wrote none of it.
    Called only when something was dropped, it encodes the split again to tell which.
    """
    ids, labels, lengths, _ = encode_flat(rendered, tokenizer)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    trained = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
    names, untrained = [], []
    for i, (a, b) in enumerate(itertools.pairwise(bounds.tolist())):
        cut = min(b, a + max_length)  # position 0 is never predicted, as in prepare()
        if trained[cut] - trained[min(a + 1, cut)] == 0:
            names.append(example_name(examples, i))
            w = weights[i] if weights is not None else None
            replies = [
                m.get("content")
                for k, m in enumerate(conversations[i])
                if m["role"] == "assistant" and (w is None or w[k] > 0)
            ]
            if trained[b] - trained[min(a + 1, b)] == 0 and any(
                isinstance(r, str) and r.strip() for r in replies
            ):
                untrained.append(names[-1])
    if untrained:
        raise ValueError(
            f"examples with a reply but no token to train on ({len(untrained)}): "
            f"{', '.join(untrained[:DROPPED_NAMED])}; their reply tokens merge with the prompt's "
            "or the template writes none of them"
        )
    return names


def describe(name: str, stats: PrepareStats) -> str:
    text = (
        f"{name}: {stats.kept} examples, {stats.tokens} tokens, "
        f"{stats.supervised_tokens} supervised"
    )
    if stats.truncated or stats.dropped:
        text += (
            f" ({stats.truncated} truncated to trainer.max_length, {stats.dropped} dropped "
            "with no response tokens left)"
        )
    named = getattr(stats, "dropped_examples", None)
    if named:
        more = stats.dropped - len(named)
        text += f"; dropped: {', '.join(named)}" + (f" and {more} more" if more > 0 else "")
    if stats.boundary_merges:
        text += (
            f"; {stats.boundary_merges} tokens cross the start or end of a trained span "
            "(BPE merged it with the text beside it), left untrained"
        )
    if getattr(stats, "quoted_specials", 0):  # encoded as text (instruct.data.content)
        text += (
            f"; {stats.quoted_specials} examples quote special-token strings in their "
            "messages, encoded as text"
        )
    return text


def tokenize_by_source(
    examples: Sequence[Example], cfg: DictConfig, tokenizer: Any
) -> tuple[list[Feature], PrepareStats, dict[str, PrepareStats]]:
    """:func:`tokenize_split` once per mixture source (``example["source"]``), so each
    source's kept, truncated and dropped examples are counted: every source's features (the
    loop shuffles them), the stats of all, and each source's. Examples without a source (one
    source, not a mixture) are one call, with no per-source stats."""
    groups: dict[str | None, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.get("source"), []).append(e)
    if list(groups) in ([], [None]):
        features, stats = tokenize_split(examples, cfg, tokenizer)
        return features, stats, {}
    parts = {str(k): tokenize_split(group, cfg, tokenizer) for k, group in groups.items()}
    features = [f for kept, _ in parts.values() for f in kept]
    per_source = {k: stats for k, (_, stats) in parts.items()}
    return features, merge_stats(list(per_source.values())), per_source


def merge_stats(parts: Sequence[PrepareStats]) -> PrepareStats:
    """Several splits' stats as one: counts added, lists of named examples joined."""
    kind = next((type(s) for s in parts if isinstance(s, SplitStats)), type(parts[0]))
    merged: dict[str, Any] = {}
    for f in fields(kind):
        values = [getattr(s, f.name) for s in parts if hasattr(s, f.name)]
        if all(isinstance(v, int | float) for v in values):
            merged[f.name] = sum(values)
        elif all(isinstance(v, list) for v in values):
            joined = [x for v in values for x in v]
            merged[f.name] = joined[:DROPPED_NAMED] if f.name == "dropped_examples" else joined
        else:
            merged[f.name] = values[0]
    return kind(**merged)
