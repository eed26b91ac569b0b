"""Conversation -> input ids + labels (the batches they make are in :mod:`instruct.data.batching`).

Labels are ``IGNORE_INDEX`` everywhere but the tokens that lie wholly inside a trained
character span (assistant replies and their end-of-turn token). Character spans go through the fast
tokenizer's own character-to-token map, so no marker is ever searched for among token ids.

A split's features are views into two flat int32 arrays (ids and labels): a fraction of the
memory of Python lists, and a cache entry loads with no per-token work. A feature whose
trained turns carry loss weights other than 1 (``data.train_on=per_message``) has a third,
float32 array of per-token weights; every other feature has ``weights=None``, and costs
nothing more. (measured: docs/performance.md, "Measurements behind design choices")
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instruct.data.content import TextEncoder, plain_encoding
from instruct.data.templates import Rendered, Span

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CACHE_FORMAT = 3  # bump when labels or truncation change meaning, so old entries go unread


@dataclass(eq=False)
class Feature:
    input_ids: np.ndarray  # int32; lists are accepted and converted
    labels: np.ndarray
    # float32 loss weight of each token (read only where a label is trained); None: all 1.
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int32)
        self.labels = np.asarray(self.labels, dtype=np.int32)
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float32)

    @classmethod
    def view(
        cls, input_ids: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
    ) -> Feature:
        """A feature over int32 arrays as they are (no conversion): slices of a split's."""
        feature = cls.__new__(cls)
        feature.input_ids, feature.labels, feature.weights = input_ids, labels, weights
        return feature

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Feature) or (self.weights is None) != (other.weights is None):
            return False
        return (
            np.array_equal(self.input_ids, other.input_ids)
            and np.array_equal(self.labels, other.labels)
            and (self.weights is None or np.array_equal(self.weights, other.weights))
        )

    @property
    def supervised(self) -> int:
        # Position 0 is never predicted: its label is dropped by the shift in the loss.
        return int(np.count_nonzero(self.labels[1:] != IGNORE_INDEX))

    @property
    def supervised_weight(self) -> float:
        """The sum of the supervised tokens' weights: the loss's denominator (``supervised``
        when the feature has no weights)."""
        if self.weights is None:
            return float(self.supervised)
        return float(self.weights[1:][self.labels[1:] != IGNORE_INDEX].sum(dtype=np.float64))


@dataclass
class PrepareStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train on after truncation
    boundary_merges: int = 0  # tokens crossing a span's start or end: untrained
    quoted_specials: int = 0  # examples whose messages quote special-token strings (as text)
    weighted: int = 0  # kept examples whose trained turns carry loss weights other than 1
    tokens: int = 0
    supervised_tokens: int = 0


def labels_from_spans(
    input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[Span]
) -> tuple[list[int], int]:
    """Labels for one sequence, and how many tokens straddle a span's start or end.

    A token is trained when it lies wholly inside a span. A token that crosses a span's
    start (BPE merged prompt and reply text) or its end (the text after a reply merged
    into the next header, e.g. Mistral's " [" of "[INST]") is left untrained and counted:
    the model never writes it at that point in the conversation.
    """
    labels = [IGNORE_INDEX] * len(input_ids)
    straddles = 0
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            break
        span_start, span_end = spans[k]
        if span_start <= start and end <= span_end:
            labels[i] = input_ids[i]
        elif start < span_start < end or start < span_end < end:
            straddles += 1
    return labels, straddles


def trained_tokens(encoding: Any, spans: Sequence[Span]) -> tuple[list[tuple[int, int]], int]:
    """Token ranges ``[a, b)`` wholly inside a span; and the straddle count.

    Asks the encoding for the token at each span's first and last character, which is the
    same rule as :func:`labels_from_spans` without building every token's offsets in Python.
    """
    n = len(encoding.ids)
    ranges, straddles = [], 0
    covered, straddled = 0, -1  # tokens before `covered` are decided; the last one counted
    for start, end in spans:
        if end <= start:
            continue
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:
            raise LookupError  # a character no token covers: use the offsets instead
        if encoding.token_to_chars(first)[0] < start:  # BPE merged it with the prompt text
            if first >= covered and first != straddled:
                straddles, straddled = straddles + 1, first
            first += 1
        # A character split over several byte-level tokens: each of them starts at it.
        while last + 1 < n and encoding.token_to_chars(last + 1)[0] < end:
            last += 1
        if last >= first and encoding.token_to_chars(last)[1] > end:  # merged past the end
            if last != straddled:
                straddles, straddled = straddles + 1, last
            last -= 1
        if first <= last:
            ranges.append((first, last + 1))
            covered = last + 1
    return ranges, straddles


def encode(rendered: Sequence[Rendered], tokenizer: Any) -> list[tuple[Feature, int]]:
    """Tokenize many rendered conversations in one batched fast-tokenizer call."""
    ids, labels, lengths, straddles = encode_flat(rendered, tokenizer)
    weights = token_weights(rendered, labels, lengths, tokenizer)  # None: no r.weights
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [
        (Feature(ids[a:b], labels[a:b], weights[a:b] if r.weights else None), k)
        for r, a, b, k in zip(rendered, bounds[:-1], bounds[1:], straddles, strict=True)
    ]


def token_weights(
    rendered: Sequence[Rendered], labels: np.ndarray, lengths: Sequence[int], tokenizer: Any
) -> np.ndarray | None:
    """Each token's loss weight: its span's, for the trained tokens of the conversations with
    ``weights``; 1 everywhere else. ``None`` when no conversation has weights.

    Only those conversations are encoded again, for their offsets: a trained token lies
    wholly inside one span, so its first character says which. The others cost nothing.
    """
    weighted = [i for i, r in enumerate(rendered) if r.weights]
    if not weighted:
        return None
    out = np.ones(len(labels), dtype=np.float32)
    bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
    backend, text = tokenizer.backend_tokenizer, None
    for i in weighted:
        r = rendered[i]
        if r.literal:
            text = text or TextEncoder.of(tokenizer)
            offsets = text.encode(r.text, r.literal)[1]
        else:
            with plain_encoding(backend):
                offsets = backend.encode(r.text, add_special_tokens=False).offsets
        a, b = bounds[i], bounds[i + 1]
        if len(offsets) != b - a:
            raise ValueError("a conversation encoded twice gave different tokens")
        starts = np.fromiter((s for s, _ in offsets), np.int64, len(offsets))
        span = np.searchsorted([s for s, _ in r.spans], starts, side="right") - 1
        w = np.asarray(r.weights, np.float32)[np.maximum(span, 0)]
        out[a:b] = np.where(labels[a:b] != IGNORE_INDEX, w, np.float32(1))
    return out


def encode_flat(
    rendered: Sequence[Rendered], tokenizer: Any
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """All ids and labels end to end, each conversation's length, and its straddle count.

    When the tokenizer's tokens tile the text byte for byte (:func:`token_byte_lengths`),
    the ids come from one batched call that tracks no offsets, and each token's position is
    the running sum of its tokens' byte lengths: the labels follow for the whole split in a
    few array operations. Conversations that do not tile (a normalizer changed their text)
    and other tokenizers go through the tokenizer's offsets instead; both give the same labels.
    Conversations that quote special-token strings (``literal`` ranges) are encoded apart,
    with those strings as text (:func:`encode_flat_quoting`).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("instruct needs a fast (Rust) tokenizer for its offset mapping")
    quoting = [i for i, r in enumerate(rendered) if r.literal]
    if quoting:
        return encode_flat_quoting(rendered, tokenizer, quoting)
    backend = tokenizer.backend_tokenizer
    with plain_encoding(backend):  # no splitting, padding or truncation left by another call
        return encode_flat_plain(rendered, backend)


def encode_flat_plain(
    rendered: Sequence[Rendered], backend: Any
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """:func:`encode_flat` of conversations that quote no special-token string."""
    texts = [r.text for r in rendered]
    table = token_byte_lengths(backend)
    if table is None or not hasattr(backend, "encode_batch_fast"):
        return encode_with_offsets(rendered, backend.encode_batch(texts, add_special_tokens=False))
    per_ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = [len(x) for x in per_ids]
    ids = np.fromiter(itertools.chain.from_iterable(per_ids), np.int32, sum(lengths))
    del per_ids
    bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    # Byte position of every token in the texts laid end to end (one past the end: total).
    position = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(table[ids], out=position[1:])
    text_bytes = [len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts]
    tiled = position[bounds[1:]] - position[bounds[:-1]] == np.asarray(text_bytes, np.int64)
    if backend.normalizer is not None:
        # dtype given: an empty list would be float, which cannot be and-ed (an empty split)
        tiled &= np.array([backend.normalizer.normalize_str(t) == t for t in texts], bool)
    trained, straddles = trained_by_position(rendered, position, bounds, tiled)
    untiled = np.flatnonzero(~tiled).tolist()
    if untiled:
        encodings = backend.encode_batch([texts[i] for i in untiled], add_special_tokens=False)
        for i, e in zip(untiled, encodings, strict=True):
            row, straddles[i] = trained_from_encoding(e, rendered[i].spans)
            trained[bounds[i] : bounds[i + 1]] = row
    return ids, np.where(trained, ids, IGNORE_INDEX).astype(np.int32), lengths, straddles


def encode_flat_quoting(
    rendered: Sequence[Rendered], tokenizer: Any, quoting: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """:func:`encode_flat` when the conversations ``quoting`` have ``literal`` ranges.

    The others take the usual path together; each quoting one is encoded in pieces between
    the template's control tokens (:class:`~instruct.data.content.TextEncoder`), and its labels
    follow the same rule from the pieces' offsets (:func:`labels_from_spans`).
    """
    quoted = set(quoting)
    clean = [r for i, r in enumerate(rendered) if i not in quoted]
    ids, labels, lengths, straddles = encode_flat(clean, tokenizer)
    bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
    text = TextEncoder.of(tokenizer)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    out_lengths, out_straddles, k = [], [], 0
    for i, r in enumerate(rendered):
        if i in quoted:
            row, offsets = text.encode(r.text, r.literal)
            trained, merges = labels_from_spans(row, offsets, r.spans)
            parts.append((np.asarray(row, np.int32), np.asarray(trained, np.int32)))
        else:
            a, b = bounds[k], bounds[k + 1]
            parts.append((ids[a:b], labels[a:b]))
            merges, k = straddles[k], k + 1
        out_lengths.append(len(parts[-1][0]))
        out_straddles.append(merges)
    return (
        np.concatenate([p[0] for p in parts]).astype(np.int32, copy=False),
        np.concatenate([p[1] for p in parts]).astype(np.int32, copy=False),
        out_lengths,
        out_straddles,
    )


def token_ids(rendered: Sequence[Rendered], tokenizer: Any) -> list[list[int]]:
    """Each conversation's token ids (a prompt, at inference), no labels: special-token
    strings its messages quote are encoded as text, as in training."""
    text = None
    out = []
    for r in rendered:
        if not r.literal:
            out.append(tokenizer(r.text, add_special_tokens=False).input_ids)
            continue
        text = text or TextEncoder.of(tokenizer)
        out.append(text.encode(r.text, r.literal)[0])
    return out


def encode_with_offsets(
    rendered: Sequence[Rendered], encodings: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    per_ids = [e.ids for e in encodings]
    lengths = [len(x) for x in per_ids]
    ids = np.fromiter(itertools.chain.from_iterable(per_ids), np.int32, sum(lengths))
    trained = np.zeros(len(ids), dtype=bool)
    straddles, start = [], 0
    for r, e, n in zip(rendered, encodings, lengths, strict=True):
        trained[start : start + n], k = trained_from_encoding(e, r.spans)
        straddles.append(k)
        start += n
    return ids, np.where(trained, ids, IGNORE_INDEX).astype(np.int32), lengths, straddles


def trained_from_encoding(encoding: Any, spans: Sequence[Span]) -> tuple[np.ndarray, int]:
    """One conversation's trained-token mask from its encoding's offsets; and its straddles."""
    trained = np.zeros(len(encoding.ids), dtype=bool)
    try:
        ranges, k = trained_tokens(encoding, spans)
        for a, b in ranges:
            trained[a:b] = True
    except LookupError:
        row, k = labels_from_spans(encoding.ids, encoding.offsets, spans)
        trained[:] = np.asarray(row, dtype=np.int64) != IGNORE_INDEX
    return trained, k


def trained_by_position(
    rendered: Sequence[Rendered], position: np.ndarray, bounds: np.ndarray, tiled: np.ndarray
) -> tuple[np.ndarray, list[int]]:
    """The rule of :func:`labels_from_spans` over byte positions, for the tiled conversations.

    A token is trained when its bytes lie wholly inside a span (spans begin and end on
    character boundaries, so that is the rule on characters too, even for a token that
    starts or ends inside a multi-byte character). A token that crosses a span's first or
    last byte stays untrained and is counted once.
    """
    first, last = [], []
    for i in np.flatnonzero(tiled).tolist():
        text, base = rendered[i].text, int(position[bounds[i]])
        ascii_text = text.isascii()
        for start, end in rendered[i].spans:
            start, end = max(start, 0), min(end, len(text))
            if end <= start:
                continue
            if not ascii_text:
                start, end = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
            first.append(base + start)
            last.append(base + end)
    starts, ends = position[:-1], position[1:]
    straddles = [0] * len(rendered)
    if not first:
        return np.zeros(len(starts), dtype=bool), straddles
    first_at, end_at = np.asarray(first), np.asarray(last)
    # Tokens [a, b) lie wholly inside the span: +1 at a, -1 at b, a running sum marks them.
    a = np.searchsorted(starts, first_at, side="left")  # the first to start in the span
    b = np.searchsorted(ends, end_at, side="right")  # one past the last to end in it
    whole = a < b
    depth = np.zeros(len(starts) + 1, dtype=np.int32)
    np.add.at(depth, a[whole], 1)
    np.add.at(depth, b[whole], -1)
    trained = np.cumsum(depth[:-1]) > 0
    holder = a - 1  # the token holding a span's first byte, when none starts on it
    inside = a < len(starts)
    straddle = holder >= 0
    straddle[inside] &= starts[a[inside]] != first_at[inside]
    # The token holding a span's last byte, when it ends past it (b: the first that does).
    crossing = b < len(starts)
    crossing[crossing] &= starts[b[crossing]] < end_at[crossing]
    holders = np.unique(np.concatenate([holder[straddle], b[crossing]]))
    holders = holders[~trained[holders]]
    if len(holders):
        who = np.searchsorted(bounds, holders, side="right") - 1
        for i, k in zip(*np.unique(who, return_counts=True), strict=True):
            straddles[int(i)] = int(k)
    return trained, straddles


def token_byte_lengths(backend: Any) -> np.ndarray | None:
    """Every token id's length in bytes, if tokens always tile the text they came from.

    That holds for byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM and most recent models):
    each vocabulary character stands for one byte, pre-tokenizers only split, and added
    tokens match their own text. It does not hold for tokenizers that rewrite the text
    (SentencePiece's ``▁``, BERT's splitting on whitespace, added tokens that eat the
    spaces beside them); they get ``None`` and labels from offsets. A normalizer is checked
    on each text by the caller, and every conversation's token bytes must sum to its length.
    """
    # The same tokenizer object, unchanged since (no tokens added, no step replaced).
    key = (
        backend.get_vocab_size(with_added_tokens=True),
        state(backend.pre_tokenizer),
        state(backend.normalizer),
    )
    if _BYTE_LENGTHS and _BYTE_LENGTHS[0][0] is backend and _BYTE_LENGTHS[0][1] == key:
        return _BYTE_LENGTHS[0][2]
    table = byte_level_lengths(backend)
    _BYTE_LENGTHS[:] = [(backend, key, table)]
    return table


_BYTE_LENGTHS: list[tuple[Any, tuple, np.ndarray | None]] = []  # the last tokenizer's table


def state(component: Any) -> str | None:
    return None if component is None else component.__getstate__().decode()


def byte_level_lengths(backend: Any) -> np.ndarray | None:
    model = backend.model
    if type(model).__name__ != "BPE" or model.byte_fallback or model.dropout:
        return None
    if model.continuing_subword_prefix or model.end_of_word_suffix:
        return None
    if backend.pre_tokenizer is None or not splits_then_bytes(
        json.loads(state(backend.pre_tokenizer))
    ):
        return None
    added = backend.get_added_tokens_decoder()
    if any(t.lstrip or t.rstrip for t in added.values()):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    size = max([*vocab.values(), *added, -1]) + 1
    table = np.full(size, 1 << 32, dtype=np.int64)  # no text is that long: never tiles
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    everything = set("".join(vocab)) <= alphabet
    for token, i in vocab.items():
        if everything or set(token) <= alphabet:
            table[i] = len(token)
    for i, t in added.items():
        table[i] = len(t.content.encode("utf-8"))
    return table


def splits_then_bytes(spec: dict[str, Any]) -> bool:
    """A pre-tokenizer that keeps every character and maps bytes to the byte-level alphabet."""
    parts = spec.get("pretokenizers") if spec.get("type") == "Sequence" else [spec]
    if not parts:
        return False
    lossless = {"ByteLevel", "Split", "Digits", "Punctuation"}
    if any(p.get("type") not in lossless or p.get("behavior") == "Removed" for p in parts):
        return False
    levels = [p for p in parts if p["type"] == "ByteLevel"]
    return len(levels) == 1 and not levels[0].get("add_prefix_space", False)


def prepare(
    rendered: Sequence[Rendered], tokenizer: Any, max_length: int
) -> tuple[list[Feature], PrepareStats]:
    """Tokenize, truncate to ``max_length`` and drop examples left with nothing to train on."""
    ids, labels, lengths, straddles = encode_flat(rendered, tokenizer)
    weights = token_weights(rendered, labels, lengths, tokenizer)  # None: no r.weights
    # int64 throughout: with no examples, NumPy would make the empty arrays float, and a
    # float array cannot index (an empty validation split crashed here).
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    kept = np.minimum(lengths, max_length)
    # Supervised tokens of each truncated example, position 0 excluded (never predicted).
    trained = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(labels != IGNORE_INDEX, out=trained[1:])
    supervised = trained[starts + kept] - trained[starts + np.minimum(kept, 1)]
    keep = supervised > 0
    stats = PrepareStats(
        examples=len(rendered),
        kept=int(keep.sum()),
        truncated=int((np.asarray(lengths) > max_length).sum()),
        dropped=int((~keep).sum()),
        boundary_merges=sum(straddles),
        quoted_specials=sum(1 for r in rendered if r.literal),
        weighted=sum(1 for r, k in zip(rendered, keep.tolist(), strict=True) if k and r.weights),
        tokens=int(kept[keep].sum()),
        supervised_tokens=int(supervised[keep].sum()),
    )
    view = Feature.view
    weighted = [bool(r.weights) for r, k in zip(rendered, keep.tolist(), strict=True) if k]
    features = [
        view(ids[a : a + n], labels[a : a + n], weights[a : a + n] if w else None)
        for a, n, w in zip(starts[keep].tolist(), kept[keep].tolist(), weighted, strict=True)
    ]
    return features, stats


def cache_key(rendered: Sequence[Rendered], tokenizer: Any, max_length: int) -> str:
    """What the features depend on: every text and trained span, the whole tokenizer, the cap.

    The template and the data are both inside the rendered text, so any change to either
    (or to the tokenizer's vocabulary, merges, normalizer or added tokens) is a new key.
    """
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, max_length, len(rendered)]).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    for r in rendered:
        h.update(f"{len(r.text)}:{r.spans}".encode())
        if r.literal:  # only then, so clean conversations keep the keys they had
            h.update(f"literal:{r.literal}".encode())
        if r.weights:
            h.update(f"weights:{r.weights}".encode())
        h.update(r.text.encode())
    return h.hexdigest()[:32]


Prepare = Callable[[Sequence[Rendered], Any, int], tuple[list[Feature], PrepareStats]]


def prepare_cached(
    rendered: Sequence[Rendered],
    tokenizer: Any,
    max_length: int,
    cache_dir: Path | None,
    work: Prepare = prepare,
) -> tuple[list[Feature], PrepareStats]:
    """``work`` (:func:`prepare`), read from ``cache_dir`` when the same work was done before.

    Entries are plain integer arrays (``.npz``, loaded without pickle), written to a
    temporary file and renamed, so a crash mid-write never leaves a half entry behind.
    """
    if cache_dir is None:
        return work(rendered, tokenizer, max_length)
    path = Path(cache_dir) / f"{cache_key(rendered, tokenizer, max_length)}.npz"
    if path.is_file():
        try:
            features, stats = load_features(path)
            log.info("tokenised %d examples read from the cache %s", stats.kept, path)
            return features, stats
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
            log.warning("ignoring unreadable tokenised cache %s (%s)", path, err)
    features, stats = work(rendered, tokenizer, max_length)
    try:
        save_features(path, features, stats)
    except OSError as err:
        log.warning("could not write the tokenised cache %s (%s)", path, err)
    return features, stats


def save_features(path: Path, features: Sequence[Feature], stats: PrepareStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    empty = np.zeros(0, np.int32)
    arrays = {
        "input_ids": np.concatenate([x.input_ids for x in features] or [empty]),
        "labels": np.concatenate([x.labels for x in features] or [empty]),
        "lengths": np.array([len(x.input_ids) for x in features], np.int64),
        "stats": np.frombuffer(json.dumps(asdict(stats)).encode(), np.uint8),
    }
    if any(x.weights is not None for x in features):  # only then: no cost without weights
        arrays["weighted"] = np.array([x.weights is not None for x in features], bool)
        arrays["weights"] = np.concatenate(
            [x.weights if x.weights is not None else np.ones(len(x.labels), np.float32)
             for x in features]
        )  # fmt: skip
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_features(path: Path) -> tuple[list[Feature], PrepareStats]:
    with np.load(path, allow_pickle=False) as entry:
        ids, labels, lengths = entry["input_ids"], entry["labels"], entry["lengths"]
        stats = PrepareStats(**json.loads(entry["stats"].tobytes()))
        weights = entry["weights"] if "weights" in entry else None
        weighted = entry["weighted"] if "weighted" in entry else np.zeros(len(lengths), bool)
    if int(lengths.sum()) != len(ids) or len(ids) != len(labels) or len(lengths) != stats.kept:
        raise ValueError("inconsistent entry")
    if weights is not None and (len(weights) != len(ids) or len(weighted) != len(lengths)):
        raise ValueError("inconsistent entry")
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    features = [
        Feature(ids[a:b], labels[a:b], weights[a:b] if w else None)
        for (a, b), w in zip(itertools.pairwise(bounds), weighted.tolist(), strict=True)
    ]
    return features, stats
