"""Examples -> token ids and labels a batch at a time: data sets larger than memory allows
as Python objects (a million Alpaca-sized rows from Parquet).

Each batch of examples is rendered and tokenised with the trainer's own functions
(:func:`instruct.data.templates.render_many`, :func:`instruct.data.tokenize.prepare`), then
kept only as packed arrays (a few bytes a token); the batch's dicts, messages and texts are freed
before the next batch is read. ``bench/bench_train.py --workloads prep_1m`` measures it beside
TRL. (measured: docs/performance.md, "Measurements behind design choices")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from instruct.data.records import Example
from instruct.kernels.memory import gc_paused
from instruct.progress import progress


@dataclass(eq=False)
class StreamedFeatures(Sequence):
    """Features of many batches in a few bytes a token, with no Python object per example.

    Each batch is kept as its token ids end to end (uint16 when the vocabulary fits, as
    SmolLM2's 49,152 tokens do; else int32), a trained-token mask (the label of a trained
    token is its id) and every example's length. ``[i]`` builds example i's
    :class:`instruct.data.tokenize.Feature` (int32 ids and labels, a few hundred bytes) on demand.
    """

    ids: list[np.ndarray] = field(default_factory=list)  # one array a batch
    trained: list[np.ndarray] = field(default_factory=list)  # bool, one a batch
    lengths: list[np.ndarray] = field(default_factory=list)  # int64, tokens of each example
    stats: Any = None  # instruct.data.tokenize.PrepareStats of everything
    _index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def append(self, features: Sequence[Any], vocab_size: int) -> None:
        """One batch's :class:`instruct.data.tokenize.Feature` list, packed."""
        from instruct.data.tokenize import IGNORE_INDEX

        empty = np.zeros(0, np.int32)
        ids = np.concatenate([f.input_ids for f in features] or [empty])
        labels = np.concatenate([f.labels for f in features] or [empty])
        trained = labels != IGNORE_INDEX
        if any(f.weights is not None for f in features):
            raise ValueError("features with loss weights cannot be packed as a mask")
        if not np.array_equal(labels[trained], ids[trained]):
            raise ValueError("a trained label differs from its token id: cannot pack as a mask")
        self.ids.append(ids.astype(np.uint16 if vocab_size <= 1 << 16 else np.int32))
        self.trained.append(trained)
        self.lengths.append(np.fromiter(map(len, (f.input_ids for f in features)), np.int64))
        self._index = None

    def index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each example's batch, start within it, and length (built once, 20 bytes each)."""
        if self._index is None:
            none = np.zeros(0, np.int64)
            lengths = np.concatenate(self.lengths or [none])
            batch = np.repeat(np.arange(len(self.lengths)), [len(x) for x in self.lengths])
            starts = np.concatenate([np.cumsum(x) - x for x in self.lengths] or [none])
            self._index = (batch.astype(np.int32), starts, lengths)
        return self._index

    def __len__(self) -> int:
        return sum(len(x) for x in self.lengths)

    def __getitem__(self, i: Any) -> Any:
        from instruct.data.tokenize import IGNORE_INDEX, Feature

        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        batch, starts, lengths = self.index()
        b, a, n = int(batch[i]), int(starts[i]), int(lengths[i])
        ids = self.ids[b][a : a + n].astype(np.int32)
        return Feature.view(ids, np.where(self.trained[b][a : a + n], ids, IGNORE_INDEX))

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for part in (self.ids, self.trained, self.lengths) for x in part)


def prepare_stream(
    batches: Iterable[Sequence[Example]],
    template: Any,
    tokenizer: Any,
    max_length: int,
    train_on: Any = "all_assistant",
    train_on_prompt: bool = False,
) -> StreamedFeatures:
    """Render, tokenise and truncate batch after batch; keep only their ids and labels.

    The same features and counts as :func:`instruct.data.tokenize.prepare` on all the examples at
    once (its drops, truncation and labels), with two batches of Python objects at a time:
    a worker thread reads and renders the next batch while this one is tokenised (the Rust
    tokenizer releases the GIL), so the reading and rendering (a sizeable share of the time
    on one core) hide behind the tokenising.
    (measured: docs/performance.md, "Measurements behind design choices")

    ``train_on`` and ``train_on_prompt`` choose the trained turns as in training
    (:func:`instruct.data.turns.select`). Loss weights other than 1 (``weight`` with
    ``train_on=per_message``) are refused, naming the example: this packed form keeps a
    trained-token mask, no weights.
    """
    from instruct.data.templates import plain_template, render_many, to_messages
    from instruct.data.tokenize import prepare
    from instruct.data.turns import select

    plain = plain_template(template)
    source = iter(batches)

    def render_next() -> list[Any] | None:
        examples = next(source, None)
        if examples is None:
            return None
        names = [str(e.get("where") or f"example {k}") for k, e in enumerate(examples)]
        conversations = [to_messages(e, plain) for e in examples]
        conversations, weights = select(conversations, train_on, train_on_prompt, names)
        for name, w in zip(names, weights or [], strict=False):
            if w is not None and any(0 < x < 1 for x in w):
                raise ValueError(
                    f"{name}: a message's weight is neither 0 nor 1, and streamed "
                    "preparation (instruct.data.stream) keeps no loss weights; prepare "
                    "these examples with instruct.data.tokenize.prepare instead"
                )
        return render_many(conversations, plain, tokenizer, weights=weights)

    out, parts = StreamedFeatures(), []
    bar = progress(desc="tokenise", unit="example")
    with gc_paused(), ThreadPoolExecutor(1, thread_name_prefix="render") as worker:
        ahead = worker.submit(render_next)
        while (rendered := ahead.result()) is not None:
            ahead = worker.submit(render_next)
            features, stats = prepare(rendered, tokenizer, max_length)
            bar.update(len(rendered))
            del rendered
            out.append(features, len(tokenizer))
            parts.append(stats)
    bar.close()
    out.stats = add_stats(parts)
    return out


def add_stats(parts: Sequence[Any]) -> Any:
    """Counts of several :class:`instruct.data.tokenize.PrepareStats` added up."""
    from instruct.data.tokenize import PrepareStats

    kind = type(parts[0]) if parts else PrepareStats
    merged = {}
    for f in fields(kind):
        values = [getattr(p, f.name) for p in parts]
        numeric = all(isinstance(v, int | float) for v in values)
        merged[f.name] = sum(values) if numeric else values[0]
    return kind(**merged)
