"""Verifiable instruction-following checks: rules a program can test, no judge model needed.

The idea follows IFEval (Zhou et al., 2023): an instruction such as "answer in 40 words or
fewer" carries a machine-checkable spec ``{"type": "max_words", "value": 40}``. Each check is a
pure function ``fn(response, **params) -> bool`` registered by name in :data:`CHECKS`.

Every check fails on a response with no visible text: an empty answer follows no instruction,
and without this rule "at most 40 words" or "no commas" would reward saying nothing.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable
from typing import Any, get_args, get_origin, get_type_hints

# A fenced answer is still "the response as JSON": models wrap JSON in ```json fences by habit.
_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```\Z", re.DOTALL | re.IGNORECASE)
# ASCII terminators end a sentence only before whitespace/end, so "3.14" and "e.g.x" stay whole;
# CJK full stops are not followed by spaces, so they always end one. Closing quotes or brackets
# straight after the terminator belong to the sentence that ends.
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|\Z)|[\u3002\uff01\uff1f]+")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_BULLET = re.compile(r"^[ \t]*[-*][ \t]+\S", re.MULTILINE)
_NUMBERED = re.compile(r"^[ \t]*\d+[.)][ \t]+\S", re.MULTILINE)
_TITLE = re.compile(r"<<[^<>\n]*[^\s<>][^<>\n]*>>")
# Straight quotes plus the typographic pair that editors and some models substitute.
_QUOTE_PAIRS = (('"', '"'), ("\u201c", "\u201d"))
# The ASCII comma and the full-width one used in CJK text.
_COMMAS = (",", "\uff0c")


def _needs_text(fn: Callable[..., bool]) -> Callable[..., bool]:
    """Make ``fn`` fail (not crash, not pass) on a response that is empty or only whitespace."""

    @functools.wraps(fn)
    def check(response: str, **params: Any) -> bool:
        if not isinstance(response, str) or not response.strip():
            return False
        return fn(response, **params)

    return check


def words(text: str) -> list[str]:
    """Whitespace-separated tokens that contain at least one letter or digit (any script)."""
    return [tok for tok in text.split() if any(ch.isalnum() for ch in tok)]


def sentences(text: str) -> list[str]:
    """Split ``text`` into sentences on terminal punctuation and blank lines.

    A heuristic: abbreviations like "Dr." count as a sentence end, as in most simple splitters.
    """
    pieces = [p for para in _BLANK_LINE.split(text) for p in _SENTENCE_END.split(para)]
    return [p.strip() for p in pieces if any(ch.isalnum() for ch in p)]


def paragraphs(text: str) -> list[str]:
    """Non-empty blocks of ``text`` separated by one or more blank lines."""
    return [p for p in _BLANK_LINE.split(text.strip()) if p.strip()]


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    # Lookarounds instead of \b so keywords that start or end with punctuation ("C++") still
    # match as whole words, and Unicode letters count as word characters.
    return re.compile(rf"(?<!\w){re.escape(keyword.strip())}(?!\w)", re.IGNORECASE)


def _count_keyword(text: str, keyword: str) -> int:
    return len(_keyword_pattern(keyword).findall(text))


@_needs_text
def max_words(response: str, value: int) -> bool:
    """At most ``value`` words."""
    return len(words(response)) <= value


@_needs_text
def min_words(response: str, value: int) -> bool:
    """At least ``value`` words."""
    return len(words(response)) >= value


@_needs_text
def max_sentences(response: str, value: int) -> bool:
    """At most ``value`` sentences."""
    return len(sentences(response)) <= value


@_needs_text
def include_keywords(response: str, keywords: list[str]) -> bool:
    """Every keyword appears as a whole word, ignoring case."""
    return all(_count_keyword(response, k) > 0 for k in keywords)


@_needs_text
def exclude_keywords(response: str, keywords: list[str]) -> bool:
    """No keyword appears as a whole word, ignoring case."""
    return not any(_count_keyword(response, k) > 0 for k in keywords)


@_needs_text
def keyword_frequency(response: str, keyword: str, min_count: int) -> bool:
    """``keyword`` appears as a whole word (ignoring case) at least ``min_count`` times."""
    return _count_keyword(response, keyword) >= min_count


@_needs_text
def json_format(response: str) -> bool:
    """The whole response is JSON, optionally inside one ```json or ``` fence."""
    text = response.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting like "[[[[..."
        return False
    return True


@_needs_text
def lowercase(response: str) -> bool:
    """No uppercase letters and at least one lowercase letter."""
    return not any(ch.isupper() for ch in response) and any(ch.islower() for ch in response)


@_needs_text
def uppercase(response: str) -> bool:
    """No lowercase letters and at least one uppercase letter."""
    return not any(ch.islower() for ch in response) and any(ch.isupper() for ch in response)


@_needs_text
def no_commas(response: str) -> bool:
    """No commas, ASCII or full-width."""
    return not any(c in response for c in _COMMAS)


@_needs_text
def bullet_count(response: str, value: int) -> bool:
    """Exactly ``value`` lines that start with "- " or "* " (after optional indentation)."""
    return len(_BULLET.findall(response)) == value


@_needs_text
def numbered_count(response: str, value: int) -> bool:
    """Exactly ``value`` lines that start with a number and "." or ")", like "1." or "2)"."""
    return len(_NUMBERED.findall(response)) == value


@_needs_text
def starts_with(response: str, text: str) -> bool:
    """After leading whitespace, the response starts with ``text`` (case-sensitive)."""
    return response.lstrip().startswith(text.lstrip())


@_needs_text
def ends_with(response: str, text: str) -> bool:
    """Before trailing whitespace, the response ends with ``text`` (case-sensitive)."""
    return response.rstrip().endswith(text.rstrip())


@_needs_text
def quoted(response: str) -> bool:
    """The whole response is wrapped in double quotes, with some text inside."""
    text = response.strip()
    return any(
        len(text) >= 2 and text.startswith(a) and text.endswith(b) and text[1:-1].strip() != ""
        for a, b in _QUOTE_PAIRS
    )


@_needs_text
def paragraph_count(response: str, value: int) -> bool:
    """Exactly ``value`` paragraphs, separated by blank lines."""
    return len(paragraphs(response)) == value


@_needs_text
def title(response: str) -> bool:
    """Contains a non-blank title in double angular brackets, like <<My Title>>."""
    return _TITLE.search(response) is not None


CHECKS: dict[str, Callable[..., bool]] = {
    fn.__name__: fn
    for fn in (
        max_words,
        min_words,
        max_sentences,
        include_keywords,
        exclude_keywords,
        keyword_frequency,
        json_format,
        lowercase,
        uppercase,
        no_commas,
        bullet_count,
        numbered_count,
        starts_with,
        ends_with,
        quoted,
        paragraph_count,
        title,
    )
}


def _params(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "type"}


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit ``hint`` (int, str or list[str]), or None when it fits."""
    if hint is int:
        # bool is an int subclass, but {"value": true} is a typo, not a count.
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, got {type(value).__name__}"
        return None if value >= 0 else f"must be >= 0, got {value}"
    if hint is str:
        if not isinstance(value, str):
            return f"must be a string, got {type(value).__name__}"
        return None if value.strip() else "must be a non-empty string"
    if get_origin(hint) is list and get_args(hint) == (str,):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"must be a list of strings, got {value!r}"
        # An empty list or keyword would make include/exclude pass or fail vacuously.
        if not value or not all(v.strip() for v in value):
            return "must be a non-empty list of non-empty strings"
        return None
    raise TypeError(f"no validation rule for parameter type {hint!r}")  # a bug in this module


def validate_checks(checks: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the problem if ``checks`` is not a valid spec list.

    A valid list holds dicts with a known ``"type"`` plus exactly that check's keyword
    parameters, each of the annotated type (int >= 0, non-empty str, non-empty list[str]).
    """
    if not isinstance(checks, list):
        raise ValueError(f"{where}: checks must be a list of dicts, got {type(checks).__name__}")
    for i, spec in enumerate(checks):
        at = f"{where}: checks[{i}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{at} must be a dict, got {type(spec).__name__}")
        kind = spec.get("type")
        if not isinstance(kind, str) or kind not in CHECKS:
            raise ValueError(f"{at}: unknown check type {kind!r}; known: {', '.join(CHECKS)}")
        fn = CHECKS[kind]
        expected = list(inspect.signature(fn).parameters)[1:]  # all but `response`
        given = _params(spec)
        missing = [p for p in expected if p not in given]
        if missing:
            raise ValueError(f"{at} ({kind}): missing parameter(s) {missing}; expects {expected}")
        unknown = [p for p in given if p not in expected]
        if unknown:
            raise ValueError(f"{at} ({kind}): unknown parameter(s) {unknown}; expects {expected}")
        hints = get_type_hints(fn)
        for name in expected:
            problem = _type_problem(given[name], hints[name])
            if problem:
                raise ValueError(f"{at} ({kind}): parameter {name!r} {problem}")


def run_checks(response: str, checks: list[dict]) -> list[dict]:
    """Run each check spec on ``response``; one ``{"type", "params", "passed"}`` dict per spec."""
    validate_checks(checks, "run_checks")
    return [
        {
            "type": spec["type"],
            "params": _params(spec),
            "passed": bool(CHECKS[spec["type"]](response, **_params(spec))),
        }
        for spec in checks
    ]


def pass_rate(results: list[list[dict]]) -> dict:
    """Prompt-level and check-level pass rates over per-prompt ``run_checks`` results.

    A prompt passes when all its checks pass (so a prompt with no checks passes); both rates
    are 0.0 when there is nothing to count.
    """
    n_prompts = len(results)
    n_checks = sum(len(r) for r in results)
    prompts_passed = sum(all(c["passed"] for c in r) for r in results)
    checks_passed = sum(c["passed"] for r in results for c in r)
    return {
        "prompt_level": prompts_passed / n_prompts if n_prompts else 0.0,
        "check_level": checks_passed / n_checks if n_checks else 0.0,
        "prompts": n_prompts,
        "checks": n_checks,
    }
