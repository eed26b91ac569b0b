"""A split's examples as training sees them, token by token, for ``python -m instruct.inspect``.

The tokens and labels are the trainer's: the same rendering (:func:`render_split`) and the
same encoding (:func:`~instruct.data.tokenize.encode_flat`) as :func:`tokenize_split`, then
the same truncation and dropping rule as :func:`~instruct.data.tokenize.prepare`. What is
added is for people: each token's text, whether it is a control (special) token, and the
lengths behind the histograms.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from instruct.data.content import TextEncoder, plain_encoding
from instruct.data.features import render_split
from instruct.data.records import Example
from instruct.data.review import example_id
from instruct.data.tokenize import IGNORE_INDEX, encode_flat

SHOWN_PAST_CUT = 48  # tokens shown after the truncation point; the rest are counted
# A token's flags in the page: trained (its label is its id) and control (a special token).
TRAINED, CONTROL = 1, 2


@dataclass
class Lengths:
    """Each example's token counts: untrained (prompt), trained (reply) and all, untruncated;
    and whether training drops it (no trained token within ``trainer.max_length``)."""

    prompt: list[int]
    reply: list[int]
    total: list[int]
    dropped: list[bool]


def control_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's special tokens: the control tokens a template writes."""
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}


def token_pieces(rendered: Sequence[Any], tokenizer: Any) -> list[list[str]]:
    """Each conversation's text cut at its tokens' starts: token i shows the text from its
    first character to the next token's (so the pieces tile the text, spaces a tokenizer
    leaves out of its offsets included). A character split over several byte-level tokens
    shows in the last of them."""
    backend = tokenizer.backend_tokenizer
    plain = [i for i, r in enumerate(rendered) if not r.literal]
    with plain_encoding(backend):
        encodings = backend.encode_batch([rendered[i].text for i in plain], False)
    offsets: dict[int, list[tuple[int, int]]] = {
        i: e.offsets for i, e in zip(plain, encodings, strict=True)
    }
    quoting = [i for i, r in enumerate(rendered) if r.literal]
    if quoting:
        text = TextEncoder.of(tokenizer)
        offsets.update({i: text.encode(rendered[i].text, rendered[i].literal)[1] for i in quoting})
    return [tiled(r.text, offsets[i]) for i, r in enumerate(rendered)]


def tiled(text: str, offsets: Sequence[tuple[int, int]]) -> list[str]:
    if not offsets:
        return []
    starts = [0] + [s for s, _ in offsets[1:]] + [len(text)]
    return [text[a:b] if b > a else "" for a, b in itertools.pairwise(starts)]


def example_views(
    examples: Sequence[Example], split: str, cfg: Any, tokenizer: Any, shown: int | None
) -> tuple[list[dict[str, Any]], Lengths]:
    """The first ``shown`` examples (None: all) of a split as the page shows them, and every
    example's lengths. Each view: ``id``, ``where``, ``source``, the token pieces ``t``,
    their ``ids`` and flags ``f`` (:data:`TRAINED` | :data:`CONTROL`), the length ``n``,
    ``cut`` (the truncation point, or None), ``dropped`` and the trained-token counts."""
    done = render_split(examples, cfg, tokenizer)
    ids, labels, lengths, _ = encode_flat(done.rendered, tokenizer)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tolist()
    trained = labels != IGNORE_INDEX
    counts = np.concatenate([[0], np.cumsum(trained)]).tolist()
    reply = [counts[b] - counts[a] for a, b in itertools.pairwise(bounds)]
    max_length = cfg.trainer.max_length
    dropped = [  # prepare()'s rule: position 0 is never predicted
        counts[min(b, a + max_length)] == counts[min(a + 1, b)]
        for a, b in itertools.pairwise(bounds)
    ]
    prompt = [n - r for n, r in zip(lengths, reply, strict=True)]
    sizes = Lengths(prompt, reply, list(lengths), dropped)
    limit = len(examples) if shown is None else min(shown, len(examples))
    pieces = token_pieces(done.rendered[:limit], tokenizer)
    controls = np.fromiter(control_ids(tokenizer), np.int64)
    views = []
    for i in range(limit):
        a, b = bounds[i], bounds[i + 1]
        row = ids[a:b]
        if len(pieces[i]) != len(row):  # offsets of other tokens than training's: decode
            pieces[i] = [tokenizer.decode([t]) for t in row.tolist()]
        flags = trained[a:b] * TRAINED + np.isin(row, controls) * CONTROL
        kept = min(b - a, max_length)
        supervised = counts[a + kept] - counts[min(a + 1, a + kept)]  # as prepare() counts
        views.append(
            view_of(examples[i], i, split, pieces[i], row, flags, kept, supervised, max_length)
        )
    return views, sizes


def view_of(
    example: Example,
    index: int,
    split: str,
    pieces: list[str],
    ids: np.ndarray,
    flags: np.ndarray,
    kept: int,
    supervised: int,
    max_length: int,
) -> dict[str, Any]:
    """One example's view (see :func:`example_views`), tokens past the cut trimmed."""
    n = len(ids)
    show = min(n, max_length + SHOWN_PAST_CUT)
    return {
        "i": index,
        "id": example_id(example),
        "split": split,
        "where": str(example.get("where") or f"{split}[{index}]"),
        "source": example.get("source"),
        "domain": example.get("domain"),
        "n": n,
        "cut": max_length if n > max_length else None,
        "dropped": supervised == 0,
        "reply": int(np.count_nonzero(flags & TRAINED)),
        "supervised": supervised,
        "kept": kept,
        "t": pieces[:show],
        "ids": ids[:show].tolist(),
        "f": "".join(str(x) for x in flags[:show].tolist()),
        "hidden": n - show,
    }


def histogram(values: Sequence[int], max_length: int, bins: int = 30) -> dict[str, Any]:
    """Counts of ``values`` in ``bins`` equal bins from 0 to past both the largest value and
    ``max_length`` (so the limit always shows), and how many lie beyond ``max_length``."""
    top = max([max_length, *values]) + 1
    edges = np.linspace(0, top, bins + 1)
    counts, _ = np.histogram(np.asarray(values, np.int64), bins=edges)
    over = sum(1 for v in values if v > max_length)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "over": over, "n": len(values)}
