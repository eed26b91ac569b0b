"""The cheap filters every candidate task passes before the similarity check, and the key
that finds exact duplicates (near duplicates: :mod:`instruct.self_instruct.dedup`)."""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from typing import Any


def _words(text: str) -> list[str]:
    return text.split()


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _instruction_length(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> bool:
    n = len(_words(task["instruction"]))
    return cfg.min_instruction_words <= n <= cfg.max_instruction_words


def _not_blacklisted(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> bool:
    return not blacklist.search(task["instruction"])


def _no_punctuation_start(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> bool:
    return task["instruction"][0] not in string.punctuation


def _ascii_start(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> bool:
    return task["instruction"][0].isascii()


def _output_length(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> bool:
    n = len(_words(task["output"]))
    return cfg.min_output_words <= n <= cfg.max_output_words


def _no_repeat(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> bool:
    norm_out, norm_inst = _norm(task["output"]), _norm(task["instruction"])
    repeats = norm_inst in norm_out and len(norm_out) < 1.2 * len(norm_inst)
    return not (norm_out == norm_inst or repeats)


def _not_truncated(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> bool:
    return not task["output"].rstrip().endswith(("...", "\u2026", "etc.", "etc"))


Check = Callable[[dict[str, str], Any, re.Pattern[str]], bool]
# In the order they run: a task is rejected for the first it fails, by that name.
CHECKS: tuple[tuple[str, Check], ...] = (
    ("instruction_length", _instruction_length),
    ("blacklist", _not_blacklisted),
    ("starts_with_punctuation", _no_punctuation_start),
    ("starts_non_ascii", _ascii_start),
    ("output_length", _output_length),
    ("output_repeats_instruction", _no_repeat),
    ("output_truncated", _not_truncated),
)


def cheap_filter(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> str | None:
    """The reason to reject ``task`` before the similarity check, or None to keep it."""
    return next((name for name, passes in CHECKS if not passes(task, cfg, blacklist)), None)


def verdicts(task: dict[str, str], cfg: Any, blacklist: re.Pattern[str]) -> dict[str, bool]:
    """Every cheap filter's verdict on ``task``, by name: True where it passes."""
    return {name: passes(task, cfg, blacklist) for name, passes in CHECKS}


def blacklist_pattern(words: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w.lower()) for w in words) or "(?!)"
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def task_key(task: dict[str, str]) -> str:
    return _norm(task["instruction"]) + "\x00" + _norm(task.get("input", ""))
