"""Content is data: a special-token string inside a message is encoded as text.

A tokenizer turns every special-token string it meets into a control token, wherever it
stands. Encoding a rendered conversation whole would then let a record whose text holds
``<|im_end|>\\n<|im_start|>assistant\\n`` forge turns in training, and a chat user forge them
at inference. So before rendering, each such string in a message is swapped for a
placeholder character (:func:`hide`), the template renders around it as around any text,
and the string comes back as a *literal* range of the rendered text (:meth:`Hidden.restore`),
which :class:`TextEncoder` encodes as text. Only the strings the template wrote are
control tokens.

A tokenizer splits its input at control tokens and encodes each piece between them on its
own, so :meth:`TextEncoder.between` does that with the template's control tokens only. Which
pieces get a leading ``▁`` is the one place where a piece's encoding depends on where it
stands (SentencePiece's ``Metaspace`` with ``prepend_scheme: first``): pieces after the first
are encoded as the tokenizer encodes a piece that follows a control token (:class:`TextEncoder`).
Every such encoding is checked against the tokenizer's own, so a tokenizer that splits
differently is an error, never a silent mis-encoding.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

Span = tuple[int, int]

# Placeholders are private-use characters of plane 15 (U+F0000..U+FFFFD): not whitespace, so
# a template that trims content keeps them, and one absent from the conversation is picked
# for each special-token string it quotes. lm-eval's prompt markers use plane 16.
_FIRST_PLACEHOLDER = 0xF0000
_LAST_PLACEHOLDER = 0xFFFFD


@dataclass(frozen=True)
class ControlTokens:
    """A tokenizer's special-token strings: what must never come from content.

    Added tokens that are not special (Qwen's ``<tool_call>``, say) are ordinary vocabulary:
    the tokenizer matches them in any text, special-token splitting off or on, as it did in
    pretraining, so they are left alone.
    """

    strings: tuple[str, ...]  # longest first: "<|im_end|>" before "<|im"
    ids: Mapping[str, int]
    exact: re.Pattern[str]  # any of the strings, as written
    matcher: re.Pattern[str]  # any of them as the tokenizer finds them (stripped spaces too)
    firsts: frozenset[str]  # the strings' first characters

    @classmethod
    def of(cls, tokenizer: Any) -> ControlTokens:
        added = getattr(tokenizer, "added_tokens_decoder", {})
        tokens = {t for t in tokenizer.all_special_tokens if t}
        tokens |= {t.content for t in added.values() if t.special and t.content}
        strings = tuple(sorted(tokens, key=lambda t: (-len(t), t)))
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in strings}
        by_content = {t.content: t for t in added.values()}
        alternatives = []
        for t in strings:
            token = by_content.get(t)
            lstrip, rstrip = getattr(token, "lstrip", False), getattr(token, "rstrip", False)
            alternatives.append(
                ("\\s*" if lstrip else "") + re.escape(t) + ("\\s*" if rstrip else "")
            )
        nothing = r"(?!)"
        return cls(
            strings,
            ids,
            re.compile("|".join(re.escape(t) for t in strings) or nothing),
            re.compile("|".join(alternatives) or nothing),
            frozenset(t[0] for t in strings),
        )

    def id_of(self, matched: str) -> int:
        """The id of a :attr:`matcher` match (its stripped spaces removed)."""
        token = self.ids.get(matched)
        return token if token is not None else self.ids[matched.strip()]

    def quotes(self, text: str) -> bool:
        """Whether ``text`` holds a special-token string."""
        return self.exact.search(text) is not None

    def quoting(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[int]:
        """Indices of the conversations whose message contents hold a special-token string.

        When the strings share their first character (``<`` for most tokenizers), a content
        without it is passed over with one ``in``, faster than a search in each content.
        (measured: docs/performance.md, "Measurements behind design choices")
        """
        if not self.strings:
            return []
        search = self.exact.search
        if len(self.firsts) == 1:
            (first,) = self.firsts
            hits = [
                i
                for i, c in enumerate(conversations)
                for m in c
                if first in m["content"] and search(m["content"])
            ]
        else:
            hits = [i for i, c in enumerate(conversations) for m in c if search(m["content"])]
        return sorted(set(hits))


def message_strings(message: Mapping[str, Any]) -> list[str]:
    """Every string a template may write from ``message``: its values, nested ones too
    (tool calls, reasoning, content parts) with the keys of nested objects (a tool call's
    argument names, written by ``tojson``), but not its role or its own keys."""
    return [s for k, v in message.items() if k != "role" for s in _strings(v)]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(k, str):
                yield k
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


@dataclass(frozen=True)
class Hidden:
    """Messages whose special-token strings are placeholders, and the way back."""

    messages: list[dict[str, Any]]
    strings: Mapping[str, str]  # placeholder character -> the special-token string
    pattern: re.Pattern[str]  # any placeholder
    tools: list[Any] | None = None  # the record's function specs, hidden alike

    def restore(
        self, text: str, spans: Sequence[Span]
    ) -> tuple[str, tuple[Span, ...], tuple[Span, ...]]:
        """``(text, spans, literal)``: the placeholders of a rendering back to their strings,
        the trained spans moved with the text, and the ranges the strings fill, merged
        where they touch (the template may write each placeholder any number of times)."""
        at = [m.start() for m in self.pattern.finditer(text)]
        if not at:
            return text, tuple(spans), ()
        grown = [0]  # characters added before the k-th placeholder's end
        for i in at:
            grown.append(grown[-1] + len(self.strings[text[i]]) - 1)

        def moved(x: int) -> int:  # placeholders before x push it right
            return x + grown[bisect.bisect_left(at, x)]

        restored = self.pattern.sub(lambda m: self.strings[m.group(0)], text)
        literal: list[Span] = []
        for k, i in enumerate(at):
            start, end = i + grown[k], i + grown[k + 1] + 1
            if literal and literal[-1][1] == start:
                literal[-1] = (literal[-1][0], end)
            else:
                literal.append((start, end))
        return restored, tuple((moved(s), moved(e)) for s, e in spans), tuple(literal)


def hide(
    messages: Sequence[Mapping[str, Any]],
    controls: ControlTokens,
    avoid: Callable[[], str] = str,
    tools: Sequence[Any] | None = None,
) -> Hidden | None:
    """``messages`` with each special-token string in their strings made a placeholder, or
    ``None`` when they hold none (then nothing changes). ``avoid()``: the text the template
    itself may write, so that no placeholder is one of its characters. ``tools``: the
    record's function specs, whose strings (names, descriptions, parameter names) are
    hidden the same way."""
    texts = [s for m in messages for s in message_strings(m)] + list(_strings(tools or []))
    if not any(controls.quotes(t) for t in texts):
        return None
    used = set(avoid()).union(*texts)
    free = (chr(c) for c in range(_FIRST_PLACEHOLDER, _LAST_PLACEHOLDER + 1) if chr(c) not in used)
    placeholder: dict[str, str] = {}

    def swap(m: re.Match[str]) -> str:
        s = m.group(0)
        if s not in placeholder:
            placeholder[s] = next(free)
        return placeholder[s]

    def masked(value: Any) -> Any:
        if isinstance(value, str):
            return controls.exact.sub(swap, value)
        if isinstance(value, Mapping):
            return {masked(k): masked(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(masked(v) for v in value)
        return value

    hidden = [{k: v if k == "role" else masked(v) for k, v in m.items()} for m in messages]
    strings = {p: s for s, p in placeholder.items()}
    pattern = re.compile("[" + "".join(strings) + "]")
    return Hidden(hidden, strings, pattern, masked(list(tools)) if tools else None)


@contextmanager
def plain_encoding(backend: Any, split_special: bool = False) -> Iterator[None]:
    """``backend`` with no padding or truncation and special-token splitting
    (``encode_special_tokens``) as asked, then as it was.

    transformers sets all three on the shared backend for a call and leaves them set until its
    next one (``split_special_tokens=True``, ``padding=True``: lm-eval pads its batches), so
    code that encodes with the backend directly must not inherit them.
    """
    split, padding, truncation = backend.encode_special_tokens, backend.padding, backend.truncation
    backend.encode_special_tokens = split_special
    if padding is not None:
        backend.no_padding()
    if truncation is not None:
        backend.no_truncation()
    try:
        yield
    finally:
        backend.encode_special_tokens = split
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)


@dataclass(frozen=True)
class TextEncoder:
    """Encodes text in which only chosen control tokens are control tokens.

    ``first`` encodes a piece that starts the text, ``later`` one after a control token
    (they differ for SentencePiece's ``Metaspace`` with ``prepend_scheme: first``, which puts
    ``▁`` before the text's first piece only). In both, the model cannot make a control
    token out of text: a Unigram or WordPiece vocabulary that lists ``<s>`` as a piece would
    otherwise segment the text ``<s>`` into the BOS token, special-token splitting or not.
    """

    tokenizer: Any
    controls: ControlTokens
    first: Any
    later: Any

    @classmethod
    def of(cls, tokenizer: Any, controls: ControlTokens | None = None) -> TextEncoder:
        controls = controls or ControlTokens.of(tokenizer)
        backend = tokenizer.backend_tokenizer
        made = _made_by_model(backend, controls)
        position = '"prepend_scheme":"first"' in (_state(backend.pre_tokenizer) or "")
        if not made and not position:
            return cls(tokenizer, controls, backend, backend)
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        _unreachable(spec["model"], made)
        first = Tokenizer.from_str(json.dumps(spec)) if made else backend
        later = Tokenizer.from_str(json.dumps(spec)) if _never_prepend(spec) else first
        return cls(tokenizer, controls, first, later)

    def encode(self, text: str, literal: Sequence[Span]) -> tuple[list[int], list[Span]]:
        """Ids and character offsets of ``text`` with its ``literal`` ranges encoded as text.

        The control tokens are the special-token strings the tokenizer finds outside the
        literal ranges. Two checks make it exact or an error, never a silent mis-encoding:
        the same splitting with every string a control token must give the tokenizer's own
        encoding of ``text`` (it does not for an added token matched after normalisation,
        say), and no control token may start inside a literal range.
        """
        controls, backend = self.controls, self.tokenizer.backend_tokenizer
        found = [
            (m.start(), m.end(), controls.id_of(m.group(0)))
            for m in controls.matcher.finditer(text)
        ]
        with plain_encoding(backend):
            whole = backend.encode(text, add_special_tokens=False).ids
        if self.between(text, found)[0] != whole:
            raise ValueError(
                "this tokenizer does not split its input at special tokens as instruct "
                "expects (an added token matched after normalisation, say), so special-token "
                "strings in message content cannot be encoded as text exactly"
            )
        starts = [a for a, _ in literal]
        ids, offsets = self.between(text, [c for c in found if not _inside(c, literal, starts)])
        special = set(controls.ids.values())
        for token, (a, _) in zip(ids, offsets, strict=True):
            if token in special and _inside((a, a + 1, token), literal, starts):
                raise ValueError(
                    f"special-token strings in message content would still become the control "
                    f"token {token} with this tokenizer, so they cannot be encoded as text"
                )
        return ids, offsets

    def between(
        self, text: str, controls: Sequence[tuple[int, int, int]]
    ) -> tuple[list[int], list[Span]]:
        """Ids and character offsets of ``text`` in which only ``controls`` (``(start, end,
        id)``, in order) are control tokens; each piece between them is encoded as text, with
        special-token splitting on, as the tokenizer encodes a piece between control tokens."""
        pieces, start = [], 0
        for a, b, _ in controls:
            pieces.append((start, a))
            start = b
        pieces.append((start, len(text)))
        first = [k for k, (a, b) in enumerate(pieces) if a < b and a == 0]
        later = [k for k, (a, b) in enumerate(pieces) if a < b and a > 0]
        encoded: dict[int, Any] = {}
        for which, tok in ((first, self.first), (later, self.later)):
            if which:
                with plain_encoding(tok, split_special=True):
                    texts = [text[pieces[k][0] : pieces[k][1]] for k in which]
                    encodings = tok.encode_batch(texts, add_special_tokens=False)
                encoded.update(zip(which, encodings, strict=True))
        ids: list[int] = []
        offsets: list[Span] = []
        for k, (a, _) in enumerate(pieces):
            if k in encoded:
                ids += encoded[k].ids
                offsets += [(a + s, a + e) for s, e in encoded[k].offsets]
            if k < len(controls):
                ids.append(controls[k][2])
                offsets.append((controls[k][0], controls[k][1]))
        return ids, offsets


def _state(component: Any) -> str | None:
    return None if component is None else component.__getstate__().decode()


def _made_by_model(backend: Any, controls: ControlTokens) -> list[str]:
    """The special-token strings that the model itself turns into a control token when they
    are encoded as text (a vocabulary piece ``<s>`` with the BOS id)."""
    special = set(controls.ids.values())
    with plain_encoding(backend, split_special=True):
        encodings = backend.encode_batch(list(controls.strings), add_special_tokens=False)
    return [s for s, e in zip(controls.strings, encodings, strict=True) if special & set(e.ids)]


def _unreachable(model: dict[str, Any], strings: Sequence[str]) -> None:
    """Rename the vocabulary pieces ``strings`` (ids kept) so no text can match them: the new
    names hold a space and a NUL, which every pre-tokenizer splits on or rewrites. BPE merges
    that would build one go too."""
    if not strings:
        return
    renamed = {s: f" \x00{s}\x00 " for s in strings}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        model["vocab"] = {renamed.get(k, k): v for k, v in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
        model["vocab"] = [[renamed.get(p, p), score] for p, score in vocab]
    if isinstance(model.get("merges"), list):
        model["merges"] = [
            m
            for m in model["merges"]
            if "".join(m.split(" ", 1) if isinstance(m, str) else m) not in renamed
        ]


def _never_prepend(spec: Any) -> bool:
    """Set every ``Metaspace`` step with ``prepend_scheme: first`` to ``never``; any set?"""
    changed = False
    if isinstance(spec, dict):
        if spec.get("type") == "Metaspace" and spec.get("prepend_scheme") == "first":
            spec["prepend_scheme"] = "never"
            changed = True
        for v in spec.values():
            changed |= _never_prepend(v)
    elif isinstance(spec, list):
        for v in spec:
            changed |= _never_prepend(v)
    return changed


def _inside(control: tuple[int, int, int], literal: Sequence[Span], starts: list[int]) -> bool:
    """Whether a match ``(start, end, id)`` overlaps a literal range (content quoted it)."""
    a, b, _ = control
    k = bisect.bisect_right(starts, a) - 1
    if k >= 0 and literal[k][1] > a:
        return True
    return k + 1 < len(literal) and literal[k + 1][0] < b
