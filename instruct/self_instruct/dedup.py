"""ROUGE-L near-duplicate filtering for generated instructions (Self-Instruct / Alpaca).

A candidate is rejected when its ROUGE-L F-measure with any instruction already in the pool is
>= a threshold (0.7 in Self-Instruct and Alpaca). The naive pass scores every pair with
``rouge-score``, which is slow: its cost grows with candidates times pool size.
(measured: docs/performance.md, "Measurements behind design choices")

:class:`RougeIndex` gives the same decisions while computing few exact scores. Two bounds, both
exact, decide which pool items can reach the threshold:

- the LCS is at most the number of common unigrams (the multiset intersection), read for the
  whole pool at once from an inverted index token -> (pool ids, counts);
- F = 2 * lcs / (m + n) <= 2 * min(m, n) / (m + n), so items of very different length drop out.

Only the survivors get an exact LCS, a bit-parallel one over token ids (Allison-Dix / Crochemore
et al.: one big-int add, subtract, and two masks per candidate token).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

_TOKEN_RE = re.compile(r"[a-z0-9]+")
# Far above any token count, so `common >= _UNREACHABLE` never holds.
_UNREACHABLE = np.iinfo(np.int32).max
# Float slack when a bound is compared with an exact score: rounding errors are ~1e-16, and
# distinct F values of sentences under 10^4 tokens differ by more than 1e-8.
_SLACK = 1e-9

Decision = tuple[bool, float, int | None]


def tokenize(text: str) -> list[str]:
    """Tokens as rouge-score's default tokenizer makes them, without stemming.

    Lowercase first (``str.lower``, so e.g. the Kelvin sign becomes ``k``), then every run of
    characters other than ``[a-z0-9]`` separates tokens; non-ASCII letters are separators.
    """
    return _TOKEN_RE.findall(text.lower())


def fmeasure(lcs: int, m: int, n: int) -> float:
    """ROUGE-L F from the LCS length of sequences of ``m`` and ``n`` tokens.

    The float operations are rouge-score's (precision, recall, then 2PR / (P + R)), so scores
    compare equal to its ``fmeasure``, not just close; the result is symmetric in ``m``, ``n``.
    """
    if m == 0 or n == 0:
        return 0.0
    precision, recall = lcs / n, lcs / m
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def match_masks(seq: Sequence[Hashable]) -> dict[Hashable, int]:
    """For each symbol of ``seq``, the bit mask of the positions where it occurs."""
    masks: dict[Hashable, int] = {}
    for i, sym in enumerate(seq):
        masks[sym] = masks.get(sym, 0) | (1 << i)
    return masks


def lcs_bits(masks: Mapping[Hashable, int], m: int, seq: Iterable[Hashable]) -> int:
    """LCS length of a sequence of ``m`` symbols (given by its :func:`match_masks`) and ``seq``.

    Bit-parallel: bit i of ``v`` is 0 where the LCS row steps up at position i, so the LCS is
    the number of zero bits. A symbol that does not occur leaves ``v`` as it is.
    """
    full = (1 << m) - 1
    v = full
    for sym in seq:
        u = v & masks.get(sym, 0)
        if u:
            v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two token lists, equal to rouge-score's ``rougeL`` ``fmeasure``."""
    if not a or not b:
        return 0.0
    return fmeasure(lcs_bits(match_masks(a), len(a), b), len(a), len(b))


def min_lcs_table(n: int, max_m: int, threshold: float) -> np.ndarray:
    """For m = 0..max_m, the smallest LCS with ``fmeasure(lcs, m, n) >= threshold``.

    Exact: it evaluates :func:`fmeasure`'s float formula for every LCS in 0..min(m, n) (numpy
    divides and multiplies with the same IEEE rounding as Python) and takes the first that
    reaches the threshold; ``_UNREACHABLE`` where none does, which covers the length bound.
    """
    lcs = np.arange(min(n, max_m) + 1, dtype=np.float64)[:, None]  # the LCS is at most n
    m = np.arange(max_m + 1, dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision, recall = lcs / max(n, 1), lcs / m
        f = np.where(lcs > 0, 2 * precision * recall / (precision + recall), 0.0)
    f[:, 0] = 0.0
    if n == 0:
        f[:] = 0.0
    ok = (f >= threshold) & (lcs <= np.minimum(m, n))
    return np.where(ok.any(axis=0), ok.argmax(axis=0), _UNREACHABLE).astype(np.int32)


class _GrowingArray:
    """An int32 array with amortised O(1) append (capacity doubles), read as a numpy view."""

    def __init__(self) -> None:
        self._data = np.empty(8, dtype=np.int32)
        self._size = 0

    def append(self, value: int) -> None:
        if self._size == len(self._data):
            self._data = np.concatenate([self._data, np.empty_like(self._data)])
        self._data[self._size] = value
        self._size += 1

    def view(self) -> np.ndarray:
        return self._data[: self._size]


class RougeIndex:
    """A growing pool of texts answering "is any item within ROUGE-L F >= threshold?".

    Items are stored as token ids with their lengths, bit masks for the exact LCS, and an
    inverted index token id -> (item ids, counts) for the common-unigram bound.
    """

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self._vocab: dict[str, int] = {}
        self._postings: list[tuple[_GrowingArray, _GrowingArray]] = []
        self._lengths = _GrowingArray()
        self._masks: list[dict[int, int]] = []
        self._tables: dict[tuple[int, float], np.ndarray] = {}
        self._max_len = 0
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self._masks)

    def add(self, text: str) -> None:
        """Append ``text`` to the pool; its index is the pool size before the call."""
        self.add_tokens(tokenize(text))

    def add_tokens(self, tokens: list[str]) -> None:
        """Append an already tokenised text (see :func:`tokenize`)."""
        item = len(self)
        ids = [self._vocab.setdefault(tok, len(self._vocab)) for tok in tokens]
        for tid, count in Counter(ids).items():
            if tid == len(self._postings):
                self._postings.append((_GrowingArray(), _GrowingArray()))
            items, counts = self._postings[tid]
            items.append(item)
            counts.append(count)
        self._lengths.append(len(ids))
        self._masks.append(match_masks(ids))
        self._max_len = max(self._max_len, len(ids))

    def most_similar(self, text: str, threshold: float) -> tuple[float, int | None]:
        """Best ROUGE-L F of ``text`` against the pool, and the item that has it.

        When some item reaches ``threshold`` the score is the exact maximum and the index the
        lowest item with it (as an argmax over all items gives). Otherwise the score is the best
        seen, below ``threshold`` but not necessarily the maximum; the index is None when no
        item was scored.
        """
        return self.most_similar_tokens(tokenize(text), threshold)

    def most_similar_tokens(self, tokens: list[str], threshold: float) -> tuple[float, int | None]:
        """:meth:`most_similar` for an already tokenised text."""
        ids = [self._vocab.get(tok, -1) for tok in tokens]
        hits, bounds = self._reachable(ids, threshold)
        lengths = self._lengths.view()
        best, best_item = 0.0, None
        # Highest bound first, so after a hit the loop stops at the first bound below the best.
        for k in np.lexsort((hits, -bounds)):
            if best_item is not None and best >= threshold and bounds[k] + _SLACK < best:
                break
            item = int(hits[k])
            length = int(lengths[item])
            score = fmeasure(lcs_bits(self._masks[item], length, ids), length, len(ids))
            if best_item is None or score > best or (score == best and item < best_item):
                best, best_item = score, item
        return best, best_item

    def _reachable(self, ids: list[int], threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Items whose common-unigram bound reaches ``threshold``, with their F bounds."""
        size, n = len(self), len(ids)
        if size == 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        lengths = self._lengths.view()
        need = self._table(n, threshold)[lengths]
        common = np.zeros(size, dtype=np.int32)
        for tid, count in Counter(ids).items():
            if tid < 0:  # not in the pool's vocabulary: matches nothing
                continue
            items, counts = (a.view() for a in self._postings[tid])
            # min(count in item, count in text): every posting has a count >= 1
            common[items] += 1 if count == 1 else np.minimum(counts, count)
        hits = np.flatnonzero(common >= need)
        total = lengths[hits] + n
        bounds = np.divide(2.0 * common[hits], total, out=np.zeros(len(hits)), where=total > 0)
        return hits, bounds

    def _table(self, n: int, threshold: float) -> np.ndarray:
        """Cached :func:`min_lcs_table`, rebuilt with doubled range when the pool outgrows it."""
        key = (n, threshold)
        table = self._tables.get(key)
        if table is None or len(table) <= self._max_len:
            table = min_lcs_table(n, max(64, 2 * self._max_len), threshold)
            self._tables[key] = table
        return table


def dedup(candidates: list[str], pool: list[str], threshold: float = 0.7) -> list[Decision]:
    """Filter ``candidates`` in order against ``pool`` plus the candidates accepted so far.

    Returns (accepted, score, index) per candidate, the index into seeds + accepted-so-far.
    A rejection (score >= threshold) carries the exact maximum score; see
    :meth:`RougeIndex.most_similar` for acceptances.
    """
    index = RougeIndex(pool)
    decisions: list[Decision] = []
    for text in candidates:
        tokens = tokenize(text)
        score, item = index.most_similar_tokens(tokens, threshold)
        accepted = score < threshold
        if accepted:
            index.add_tokens(tokens)
        decisions.append((accepted, score, item))
    return decisions


def naive_dedup(candidates: list[str], pool: list[str], threshold: float = 0.7) -> list[Decision]:
    """The reference: :func:`dedup` by rouge-score against every pool item (quadratic).

    Scores are exact for acceptances too; the index is the first item with the maximum score,
    None for an empty pool.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    items = list(pool)
    decisions: list[Decision] = []
    for text in candidates:
        scores = [scorer.score(text, item)["rougeL"].fmeasure for item in items]
        best = max(scores, default=0.0)
        item = scores.index(best) if scores else None
        accepted = best < threshold
        if accepted:
            items.append(text)
        decisions.append((accepted, best, item))
    return decisions
